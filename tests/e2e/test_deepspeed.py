"""Chain adapters under DeepSpeed ZeRO-2 and ZeRO-3 through transformers' Trainer: two CPU processes, gloo, torchrun.

Each engine's saved adapter is compared with the same Trainer run under DDP (workers/trainer_train.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import WEIGHTS, chain_model, logits_of, tiny_llama, torchrun
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from axolotl_chainlora.cores import CHAIN_TYPES, core_shapes
from axolotl_chainlora.export import fold_to_lora, merge_to_full_model

# the `deepspeed` extra (scripts/install.sh installs it)
pytest.importorskip("deepspeed")
# any test alone, with the three launches it needs: about 90 s on two CPU cores
pytestmark = pytest.mark.slow

# ZeRO-3 rounds differently from DDP (measured: at most 2.9e-6, linchain); ZeRO-2 matches DDP bit for bit
ZERO3_ATOL = 1e-5
MODULES = 6  # q_proj, v_proj and down_proj in each of the tiny Llama's 2 layers


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """OUT/ENGINE/CHAIN_TYPE: every chain type trained by one launch per engine (a launch costs 12-25 s)."""
    out = tmp_path_factory.mktemp("deepspeed")
    for engine in ("ddp", "zero2", "zero3"):
        torchrun("trainer_train.py", str(out), ",".join(CHAIN_TYPES), engine)
    return out


def saved(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / WEIGHTS)


def max_difference(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between like-named tensors, and the tensor where it is."""
    return max(((tensors[name] - ref).abs().max().item(), name) for name, ref in reference.items())


@pytest.mark.parametrize("chain_type", CHAIN_TYPES)
def test_zero2_and_zero3_save_the_adapter_ddp_trains(runs, chain_type):
    """ZeRO-2 (exactly) and ZeRO-3 (to rounding) train and save the adapter DDP does: every tensor whole, cores
    split unevenly between the ranks included, and B trained."""
    ddp = saved(runs / "ddp" / chain_type)
    r = PeftConfig.from_pretrained(runs / "ddp" / chain_type).r
    # the tensors and shapes of the model the workers train, cores included
    expected = get_peft_model_state_dict(chain_model(chain_type, seed=None, chain_dims=None, r=r))
    assert sum(".lora_core." in name for name in expected) == MODULES * len(core_shapes(chain_type, r))
    # odd sizes: ZeRO-3 pads one rank's slice of every core
    assert all(tensor.numel() % 2 for name, tensor in expected.items() if ".lora_core." in name)
    for engine in ("ddp", "zero2", "zero3"):
        adapter = ddp if engine == "ddp" else saved(runs / engine / chain_type)
        assert {name: t.shape for name, t in adapter.items()} == {name: t.shape for name, t in expected.items()}
        # B starts at zero
        assert all(adapter[name].abs().max() > 0 for name in adapter if ".lora_B." in name), engine
    difference, where = max_difference(saved(runs / "zero2" / chain_type), ddp)
    assert difference == 0, f"ZeRO-2 differs from DDP by {difference:.2e} ({where})"
    difference, where = max_difference(saved(runs / "zero3" / chain_type), ddp)
    assert difference <= ZERO3_ATOL, f"ZeRO-3 differs from DDP by {difference:.2e} ({where})"


def test_the_comparison_catches_a_run_one_step_short(runs, tmp_path):
    """DDP stopped one step early (the same batches, one AdamW update fewer) is caught far above ZeRO-3's
    tolerance: the comparison above can fail."""
    torchrun("trainer_train.py", str(tmp_path), "linchain", "ddp", "--steps", "5")
    difference, where = max_difference(saved(tmp_path / "ddp" / "linchain"), saved(runs / "zero3" / "linchain"))
    assert difference > 100 * ZERO3_ATOL, f"one step fewer differs by only {difference:.2e} ({where})"


@pytest.mark.parametrize("chain_type", CHAIN_TYPES)
def test_zero3_adapter_folds_and_merges_to_its_own_logits(runs, chain_type, tiny_llama_dir, input_ids, tmp_path):
    """The ZeRO-3 save, folded into a plain PEFT LoRA or merged into the base, gives the chain adapter's logits."""
    adapter = runs / "zero3" / chain_type
    chain = logits_of(PeftModel.from_pretrained(tiny_llama(), adapter), input_ids)
    lora = PeftModel.from_pretrained(tiny_llama(), fold_to_lora(adapter, tmp_path / "folded"))
    assert type(lora.peft_config["default"]) is LoraConfig
    merged = AutoModelForCausalLM.from_pretrained(merge_to_full_model(adapter, tiny_llama_dir, tmp_path / "merged"))
    # the adapter moves the logits, so agreeing on them is not agreeing on the base's
    moved = (chain - logits_of(tiny_llama(), input_ids)).abs().max().item()
    assert moved > 1e-3, f"the trained adapter moves the logits by only {moved:.2e}"
    for what, logits in (("folded", logits_of(lora, input_ids)), ("merged", logits_of(merged, input_ids))):
        difference = (logits - chain).abs().max().item()
        assert difference <= 1e-5, f"the {what} model's logits differ by {difference:.2e}"


def test_cola_through_the_trainer_on_zero2_and_zero3_ties_the_knots_ddp_ties(tmp_path):
    """ColaCallback in transformers' Trainer under ZeRO-2/3 (accelerate's wrapper around DeepSpeed's optimizer):
    the adapter after two knots, tied links into the base, is the DDP run's."""
    for engine in ("ddp", "zero2", "zero3"):
        torchrun("trainer_train.py", str(tmp_path), "linchain,mtlora_ctcm", engine, "--cola", "base")
    for chain_type in ("linchain", "mtlora_ctcm"):
        ddp = saved(tmp_path / "ddp" / chain_type)
        assert PeftConfig.from_pretrained(tmp_path / "ddp" / chain_type).cola_tied_ranks == [3, 3]
        for engine, tolerance in (("zero2", 0.0), ("zero3", ZERO3_ATOL)):
            assert PeftConfig.from_pretrained(tmp_path / engine / chain_type).cola_tied_ranks == [3, 3]
            difference, where = max_difference(saved(tmp_path / engine / chain_type), ddp)
            print(f"COLA {chain_type} {engine} vs DDP: {difference:.2e}")
            assert difference <= tolerance, f"{engine} differs from DDP by {difference:.2e} ({where})"
