"""COLA under axolotl's DPO trainer, through the real `axolotl train`.

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
from helpers import output_of, require_success, write_config
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
def dpo_run(workspace):
    with open(workspace / "pairs.jsonl", "w") as pairs:
        for record in demo_records(count=64, seed=3):
            prompt = f"### Instruction:\n{record['instruction']}\n\n### Response:\n"
            pairs.write(json.dumps({"prompt": prompt, "chosen": record["output"], "rejected": record["output"][::-1]}))
            pairs.write("\n")
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
