"""COLA through the real `axolotl` CLI on the demo's tiny Llama: train with knots, resume across a knot,
export and merge, a 4-bit base, and a bad schedule refused before any model loads.

Runtime on a 2-core CPU: about 70 seconds; independent runs go two at a time.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import load_base, logits_of, output_of, require_success, run_all, write_config
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import axolotl_chainlora  # noqa: F401  registers LORA_CHAIN with PEFT

COLA = {"cola_links": 3, "cola_knots": [4, 8], "cola_ranks": [8, 4, 4], "max_steps": 12}
RUNS = {
    # plain LoRA, rank step-down, float32 base (auto: tied links go into the base), checkpoints every 3 steps
    "lora": {"adapter": "lora", **COLA, "save_strategy": "steps", "save_steps": 3, "chain_export_lora": True},
    "linchain": {"adapter": "linchain", "cola_links": 2, "cola_merge": "frozen", "max_steps": 8},
    "qlora": {"adapter": "qlora", "load_in_4bit": True, "cola_links": 2, "max_steps": 8},
}


@pytest.fixture(scope="module")
def cola_runs(workspace):
    """`axolotl train` for every run of RUNS and for a schedule with too few knots."""
    configs = {name: write_config(workspace, name, **changes) for name, changes in RUNS.items()}
    bad = write_config(workspace, "bad-knots", adapter="lora", cola_links=3, cola_knots=[0.5])
    jobs = {f"train-{name}": ["train", config] for name, config in configs.items()}
    jobs["train-bad-knots"] = ["train", bad]
    return run_all(workspace, jobs)


@pytest.fixture(scope="module")
def after_training(workspace, cola_runs):
    """The run resumed from checkpoint-6 (between the knots) and merge-lora of the plain-LoRA COLA run."""
    require_success(cola_runs["train-lora"], "axolotl train (lora + COLA)")
    resumed = write_config(
        workspace, "resumed", **RUNS["lora"], resume_from_checkpoint=str(workspace / "out-lora" / "checkpoint-6")
    )
    return run_all(workspace, {"train-resumed": ["train", resumed], "merge-lora": ["merge-lora", "lora.yml"]})


def test_knots_are_tied_logged_and_every_link_is_saved(workspace, cola_runs):
    log = output_of(cola_runs["train-lora"])
    for link, step in ((1, 4), (2, 8)):
        assert re.search(rf"'cola/link': {link}, 'cola/knot_step': {step}, 'cola/tied_update_norm': '[0-9.e-]+'", log)
    assert "tied links added into the base weights" in log
    assert len(re.findall(r"\{'loss': ", log)) == 12  # the knot events did not replace a step's loss line
    out = workspace / "out-lora"
    for directory, tied in ((out, [8, 4]), (out / "checkpoint-6", [8]), (out / "checkpoint-3", None)):
        saved = json.loads((directory / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA_CHAIN" and saved["chain_type"] == "lora"
        assert saved.get("cola_tied_ranks") == tied, directory
        tensors = load_file(directory / "adapter_model.safetensors")
        tied_A = [key for key in tensors if ".lora_tied_A." in key]
        assert len(tied_A) == (14 if tied else 0), directory  # 7 projections x 2 layers
        assert all(tensors[key].shape[0] == sum(tied) for key in tied_A), directory
    final = load_file(out / "adapter_model.safetensors")
    assert all(final[key].shape[0] == 4 for key in final if key.endswith(".lora_A.weight"))  # the last link, rank 4


@pytest.mark.slow  # alone, with the two rounds of axolotl runs it needs: about 75 s
def test_resume_between_knots_matches_the_uninterrupted_run(workspace, after_training):
    require_success(after_training["train-resumed"], "axolotl train resumed from checkpoint-6")
    whole = load_file(workspace / "out-lora" / "adapter_model.safetensors")
    resumed = load_file(workspace / "out-resumed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0, msg=key)
    assert "'cola/link': 2, 'cola/knot_step': 8" in output_of(after_training["train-resumed"])


@pytest.mark.slow  # alone, with the two rounds of axolotl runs it needs: about 75 s
def test_export_and_merge_equal_the_cola_adapter(workspace, after_training, probe):
    chain = PeftModel.from_pretrained(load_base(workspace), workspace / "out-lora").eval()
    chain_logits = logits_of(chain, probe)
    assert (chain_logits - logits_of(load_base(workspace), probe)).abs().max() > 1e-2

    plain = PeftModel.from_pretrained(load_base(workspace), workspace / "out-lora" / "plain_lora").eval()
    assert type(plain.peft_config["default"]) is LoraConfig and plain.peft_config["default"].r == 16  # 8 + 4 + 4
    fold_diff = (logits_of(plain, probe) - chain_logits).abs().max().item()

    require_success(after_training["merge-lora"], "axolotl merge-lora (lora + COLA)")
    merged = AutoModelForCausalLM.from_pretrained(workspace / "out-lora" / "merged", dtype=torch.float32).eval()
    merge_diff = (logits_of(merged, probe) - chain_logits).abs().max().item()
    print(f"COLA (3 links): plain-LoRA fold {fold_diff:.2e}, merge-lora {merge_diff:.2e} vs the adapter")
    assert fold_diff <= 1e-5 and merge_diff <= 1e-5


@pytest.mark.parametrize("name", ["linchain", "qlora"])
def test_cola_on_a_chain_adapter_and_on_a_4bit_base(workspace, cola_runs, name):
    result = cola_runs[f"train-{name}"]
    require_success(result, f"axolotl train ({name} + COLA)")
    assert "'cola/link': 1, 'cola/knot_step': 4" in output_of(result)
    assert "tied links kept as frozen factors beside the base" in output_of(result)
    saved = json.loads((workspace / f"out-{name}" / "adapter_config.json").read_text())
    assert saved["cola_tied_ranks"] == [8]
    assert saved["chain_type"] == ("linchain" if name == "linchain" else "lora")


def test_bad_schedule_fails_before_any_model_loads(workspace, cola_runs):
    result = cola_runs["train-bad-knots"]
    output = output_of(result)
    assert result.returncode != 0
    assert "cola_knots=[0.5] has 1 knots, but cola_links=3 needs 2" in output, output[-3000:]
    for sign in ("Loading weights", "found linear modules", "trainable params"):
        assert sign not in output, sign
