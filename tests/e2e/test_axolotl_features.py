"""axolotl features that reach a chain adapter: several in one `axolotl train` run where they can share it (CI's
budget), and torch_compile against an eager run. Each assertion fails if its feature is silently dropped. NEFTune and
LoRA+ are checked in process (tests/unit/test_plugin_hooks.py); the shared run trains with NEFTune on as well."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import load_base, output_of, require_success, run_all, write_config
from peft import PeftModel
from safetensors.torch import load_file

from axolotl_chainlora.demo import run_axolotl

STEPS = 6


@pytest.fixture(scope="module")
def features_run(workspace):
    config = write_config(
        workspace, "features", lora_modules_to_save=["lm_head"], peft_layers_to_transform=[1], sample_packing=True,
        val_set_size=0.1, eval_steps=3, gradient_accumulation_steps=2, neftune_noise_alpha=5, max_steps=STEPS,
    )  # fmt: skip
    return run_axolotl(["train", config], workspace, "features.log")


def test_layers_to_transform_modules_to_save_and_packed_eval_reach_the_chain_adapter(workspace, features_run):
    require_success(features_run, "axolotl train (linchain with modules_to_save, layers_to_transform, packing)")
    out = workspace / "out-features"
    tensors = load_file(out / "adapter_model.safetensors")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN" and saved["layers_to_transform"] == [1]

    # peft_layers_to_transform: the chain (A, B and the core) in decoder layer 1 only
    adapted_layers = {re.search(r"layers\.(\d+)\.", key).group(1) for key in tensors if ".lora_" in key}
    assert adapted_layers == {"1"}
    assert any(".lora_core." in key for key in tensors)

    # lora_modules_to_save: lm_head trained, saved whole, and loaded back as the adapter's own copy
    base = load_base(workspace)
    saved_head = tensors["base_model.model.lm_head.weight"]
    assert not torch.equal(saved_head, base.lm_head.weight)
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(reloaded.base_model.model.lm_head.modules_to_save["default"].weight, saved_head)

    # sample packing with evaluation: packed eval batches through the chain adapter give a finite loss
    log = output_of(features_run)
    eval_losses = [float(value) for value in re.findall(r"'eval_loss': '([0-9.]+)'", log)]
    print(f"eval losses: {eval_losses}")
    assert eval_losses and all(math.isfinite(loss) for loss in eval_losses)
    assert len(re.findall(r"\{'loss': ", log)) == STEPS  # with gradient_accumulation_steps: 2


@pytest.fixture(scope="module")
def compiled_and_eager_runs(workspace):
    jobs = {name: ["train", write_config(workspace, name, max_steps=4, **changes)]
            for name, changes in (("eager", {}), ("compiled", {"torch_compile": True}))}  # fmt: skip
    return run_all(workspace, jobs)


def test_torch_compile_trains_the_eager_adapter_to_float_rounding(workspace, compiled_and_eager_runs):
    """torch_compile: true compiles the model with its chain layers; the adapter it trains is the eager run's up to
    the compiled kernels' float32 rounding (measured 1.0e-5 against B entries of about 1e-2). Bit-identical tensors
    would mean the compile was dropped: two eager runs of the same seed are bit-identical on the CPU."""
    for name, result in compiled_and_eager_runs.items():
        require_success(result, f"axolotl train ({name})")
    eager = load_file(workspace / "out-eager" / "adapter_model.safetensors")
    compiled = load_file(workspace / "out-compiled" / "adapter_model.safetensors")
    assert eager.keys() == compiled.keys()
    diff = max((eager[key] - compiled[key]).abs().max().item() for key in eager)
    print(f"torch_compile vs eager, adapter tensors: max abs diff {diff:.1e}")
    assert 0 < diff <= 1e-4
