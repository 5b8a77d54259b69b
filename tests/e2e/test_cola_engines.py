"""COLA knots under DDP, FSDP2 and DeepSpeed ZeRO-2/3: two CPU processes, gloo (workers/cola_engines_train.py).

A knot rewrites the link where each engine keeps it (whole tensors, DTensor shards, DeepSpeed's fp32 master copy
and flat Adam state). The references come from outside the code under test: a fresh torch AdamW's first step on
the same parameters and gradients, and the same run under DDP. Each engine's knot has a negative control.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import WEIGHTS, logits_of, tiny_llama, torchrun
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from axolotl_chainlora.export import fold_to_lora, merge_to_full_model

pytest.importorskip("deepspeed")  # the `deepspeed` extra (scripts/install.sh installs it)

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
# ZeRO-3 reduces gradients in another order than DDP: float32 rounding that depends on the machine (at most 7.7e-7 on
# one, 2.2e-6 on another with the same library versions); the negative controls are >= 3.6e-3. The others match DDP
# bit for bit
AGAINST_DDP = {"ddp": 0.0, "fsdp2": 0.0, "zero2": 0.0, "zero3": 1e-5}
# (where the knots tie, the links' ranks): frozen factors beside the base; into the base, with a rank step-down
CASES = {"frozen": ("frozen", "3,3,3"), "base-step-down": ("base", "3,2,2")}


def run(out: Path, engine: str, merge: str, *options: str) -> list[dict]:
    """Both ranks' results of one worker run."""
    torchrun("cola_engines_train.py", str(out), engine, merge, *options)
    return [torch.load(out / f"{engine}-{merge}-rank{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, str, Path, dict[str, list[dict]]]:
    merge, ranks = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    return merge, ranks, out, {engine: run(out, engine, merge, "--ranks", ranks) for engine in ENGINES}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_the_first_update_of_each_new_link_is_a_fresh_optimizers(case):
    _, _, _, results = case
    for engine, ranks in results.items():
        for rank, result in enumerate(ranks):
            print(f"{engine} rank {rank}: first update after each knot vs a fresh AdamW: {result['first_updates']}")
            assert result["first_updates"] == [0.0, 0.0], (engine, rank)


def test_every_engine_trains_the_chain_ddp_trains_and_every_rank_holds_it(case):
    _, ranks, _, results = case
    ddp = results["ddp"][0]["snapshots"]
    for engine, (rank0, rank1) in results.items():
        for step, (mine, theirs, reference) in enumerate(zip(rank0["snapshots"], rank1["snapshots"], ddp), 1):
            assert worst(mine, theirs) == 0, (engine, step)  # all ranks alike, after every knot too
            difference = worst(mine, reference)
            print(f"{engine} step {step}: vs DDP {difference:.2e}")
            assert difference <= AGAINST_DDP[engine], (engine, step, difference)
        # the knots happened: two links tied beside (or into) the base, of the schedule's ranks
        tied = [name for name in rank0["snapshots"][-1] if ".lora_tied_A." in name]
        assert len(tied) == 6 and all(
            rank0["snapshots"][-1][n].shape[0] == sum(map(int, ranks.split(",")[:2])) for n in tied
        )


def test_each_engines_saved_adapter_is_ddps_at_the_links_own_rank_and_folds_and_merges(
    case, tmp_path, input_ids, tiny_llama_dir
):
    merge, ranks, out, _ = case
    last_rank = int(ranks.split(",")[-1])
    reference = load_file(out / f"ddp-{merge}-adapter" / WEIGHTS)
    for engine in ENGINES:
        adapter = out / f"{engine}-{merge}-adapter"
        tensors = load_file(adapter / WEIGHTS)
        assert worst(tensors, reference) <= AGAINST_DDP[engine], engine
        assert PeftConfig.from_pretrained(adapter).r == last_rank
        # what a true link of that rank writes: the step-down's zero padding is cut away
        assert {t.shape[0] for name, t in tensors.items() if ".lora_A." in name} == {last_rank}, engine
    adapter = out / f"zero3-{merge}-adapter"
    chain = logits_of(PeftModel.from_pretrained(tiny_llama(), adapter), input_ids)
    folded = PeftModel.from_pretrained(tiny_llama(), fold_to_lora(adapter, tmp_path / "folded"))
    assert type(folded.peft_config["default"]) is LoraConfig
    merged = AutoModelForCausalLM.from_pretrained(merge_to_full_model(adapter, tiny_llama_dir, tmp_path / "merged"))
    assert (chain - logits_of(tiny_llama(), input_ids)).abs().max() > 1e-3  # the adapter does something
    for model in (folded, merged):
        assert (logits_of(model, input_ids) - chain).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "engine, control",
    [
        ("zero2", "no-master"),
        ("zero3", "no-master"),
        ("zero2", "no-state-reset"),
        ("zero3", "no-state-reset"),
        ("zero2", "keep-step"),
        ("fsdp2", "no-state-reset"),
    ],
)
def test_a_knot_that_leaves_out_a_write_is_caught(engine, control, tmp_path):
    """Negative controls: a knot that skips DeepSpeed's fp32 master copy, the optimizer state, or Adam's step count
    fails the fresh-optimizer comparison above."""
    rank0, _ = run(tmp_path, engine, "frozen", "--control", control)
    print(f"{engine} {control}: first update after each knot vs a fresh AdamW: {rank0['first_updates']}")
    assert min(rank0["first_updates"]) > 1e-3


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_bf16_knots_tie_frozen_factors_every_rank_holds(engine, tmp_path):
    """bf16 compute (FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16): the tied factors are buffers no engine casts."""
    rank0, rank1 = run(tmp_path, engine, "frozen", "--bf16")
    last0, last1 = rank0["snapshots"][-1], rank1["snapshots"][-1]
    assert worst(last0, last1) == 0
    assert all(torch.isfinite(t).all() for t in last0.values())
    assert sum(".lora_tied_A." in name for name in last0) == 6
