"""COLA and the chain adapters under axolotl's DPO, KTO and ORPO trainers, through the real `axolotl train`.

axolotl lets TRL build the adapter for DPO, IPO and KTO, and TRL's reference model is then the policy with its
adapter disabled. A knot that added the finished link into the base weights would make that reference the policy:
right after the knot every reward and margin would be exactly 0 (the loss log(2)). `cola_merge: auto` therefore
keeps the links beside the base under DPO, IPO and KTO, even on a float32 base (tests/unit/test_cola.py checks that
the disabled adapter is then exactly the base model; test_axolotl_config.py the refusal of an explicit `base`).
"""

from __future__ import annotations

import ast
import json
import re

import pytest
from helpers import load_base, logits_of, output_of, require_success, run_all, write_config
from peft import PeftModel
from safetensors.torch import load_file

from axolotl_chainlora.demo import demo_records, run_axolotl

STEPS, KNOT = 6, 3


def logged_metrics(log: str) -> list[dict[str, float]]:
    """The Trainer's per-step log lines ({'loss': ..., 'rewards/chosen': ...}), as numbers."""
    return [
        {key: float(value) for key, value in ast.literal_eval(line).items()}
        for line in re.findall(r"\{'loss': [^{}]*\}", log)
    ]


@pytest.fixture(scope="module")
def preference_data(workspace) -> None:
    """pairs.jsonl (prompt, chosen, rejected: the answer reversed) for DPO and ORPO; kto.jsonl (prompt, completion,
    label) for KTO, every other completion reversed and labelled undesirable."""
    with open(workspace / "pairs.jsonl", "w") as pairs, open(workspace / "kto.jsonl", "w") as kto:
        for index, record in enumerate(demo_records(count=64, seed=3)):
            prompt = f"### Instruction:\n{record['instruction']}\n\n### Response:\n"
            answer, reversed_answer = record["output"], record["output"][::-1]
            pairs.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": reversed_answer}) + "\n")
            desirable = index % 2 == 0
            kto.write(json.dumps({"prompt": prompt, "completion": answer if desirable else reversed_answer,
                                  "label": desirable}) + "\n")  # fmt: skip


@pytest.fixture(scope="module")
def dpo_run(workspace, preference_data):
    config = write_config(
        workspace, "dpo-cola", rl="dpo", cola_links=2, cola_knots=[KNOT], max_steps=STEPS, micro_batch_size=4,
        datasets=[{"path": "./pairs.jsonl", "ds_type": "json", "type": "passthrough", "split": "train"}],
    )  # fmt: skip
    return run_axolotl(["train", config], workspace, "dpo-cola.log")


def test_dpo_with_cola_keeps_the_reference_at_the_base_model(workspace, dpo_run):
    require_success(dpo_run, "axolotl train (rl: dpo, cola_links: 2)")
    log = output_of(dpo_run)
    # a float32 base: auto would add the links into it, but not under DPO
    assert "tied links kept as frozen factors beside the base" in log
    assert f"COLA knot after step {KNOT}: link 1 tied" in log
    steps = logged_metrics(log)
    assert len(steps) == STEPS
    # the first step's policy is the base: rewards 0, loss log(2)
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    # after the knot the policy still holds the tied link and the reference does not: rewards are not 0
    after_knot = steps[KNOT]
    print(f"step {KNOT + 1}, right after the knot: {after_knot}")
    assert after_knot["rewards/chosen"] != 0 and after_knot["rewards/margins"] != 0
    saved = json.loads((workspace / "out-dpo-cola" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN" and saved["cola_tied_ranks"] == [8]
    assert any(".lora_tied_A." in key for key in load_file(workspace / "out-dpo-cola" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def kto_and_orpo_runs(workspace, preference_data):
    """KTO on MTLoRA-ICFM and ORPO on MoSLoRA, each with COLA (a knot after step KNOT); the data as they are (no
    `type`: the columns are the trainer's own)."""
    kto = write_config(
        workspace, "kto-cola", rl="kto", adapter="mtlora", mtlora_structure="icfm", cola_links=2, cola_knots=[KNOT],
        max_steps=STEPS, micro_batch_size=4, remove_unused_columns=False,
        datasets=[{"path": "./kto.jsonl", "ds_type": "json", "split": "train"}],
    )  # fmt: skip
    orpo = write_config(
        workspace, "orpo-cola", rl="orpo", adapter="moslora", cola_links=2, cola_knots=[KNOT], max_steps=STEPS,
        micro_batch_size=4, datasets=[{"path": "./pairs.jsonl", "ds_type": "json", "split": "train"}],
    )  # fmt: skip
    return run_all(workspace, {"kto-cola": ["train", kto], "orpo-cola": ["train", orpo]})


def reloads_as_trained(workspace, probe, out_dir: str, chain_type: str) -> None:
    """The saved adapter loads in PEFT as the chain adapter with its tied link, away from the base model, and
    computes what its exact plain-LoRA fold (chain_export_lora) computes."""
    saved = json.loads((workspace / out_dir / "adapter_config.json").read_text())
    assert (saved["chain_type"], saved["cola_tied_ranks"]) == (chain_type, [8])
    base_logits = logits_of(load_base(workspace), probe)
    adapter_logits = logits_of(PeftModel.from_pretrained(load_base(workspace), workspace / out_dir), probe)
    fold_logits = logits_of(PeftModel.from_pretrained(load_base(workspace), workspace / out_dir / "plain_lora"), probe)
    assert (adapter_logits - base_logits).abs().max() > 1e-3
    assert (adapter_logits - fold_logits).abs().max() <= 1e-5


def test_kto_with_cola_keeps_the_reference_at_the_base_model(workspace, probe, kto_and_orpo_runs):
    result = kto_and_orpo_runs["kto-cola"]
    require_success(result, "axolotl train (rl: kto, adapter: mtlora, cola_links: 2)")
    log = output_of(result)
    assert "tied links kept as frozen factors beside the base" in log
    assert f"COLA knot after step {KNOT}: link 1 tied" in log
    # KTO logs its reward metrics on the steps whose batch has them: the first, and one after the knot
    steps = [step for step in logged_metrics(log) if "kl" in step]
    assert steps[0]["kl"] == 0 and steps[0]["rewards/chosen"] == 0  # the policy starts as the reference
    after_knot = [step for step in steps if step["epoch"] > steps[0]["epoch"] * KNOT]
    print(f"KTO steps with rewards after the knot: {after_knot}")
    assert after_knot and all(step["rewards/chosen"] != 0 for step in after_knot if "rewards/chosen" in step)
    reloads_as_trained(workspace, probe, "out-kto-cola", "mtlora_icfm")


def test_orpo_with_cola_ties_into_the_base_and_learns(workspace, probe, kto_and_orpo_runs):
    """ORPO has no reference model: on a float32 base, auto adds the finished link into the base weights."""
    result = kto_and_orpo_runs["orpo-cola"]
    require_success(result, "axolotl train (rl: orpo, adapter: moslora, cola_links: 2)")
    log = output_of(result)
    assert "tied links added into the base weights" in log and f"COLA knot after step {KNOT}: link 1 tied" in log
    losses = [step["loss"] for step in logged_metrics(log)]
    print(f"ORPO losses: {losses}")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    reloads_as_trained(workspace, probe, "out-orpo-cola", "moslora")
