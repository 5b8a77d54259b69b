"""resume_from_checkpoint through `axolotl train`: an interrupted, resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import torch
from helpers import require_success, write_config
from safetensors.torch import load_file

from axolotl_chainlora.demo import run_axolotl


def axolotl_train(workspace, config_name):
    result = run_axolotl(["train", config_name], workspace, f"{config_name}.log")
    require_success(result, f"axolotl train {config_name}")


def test_resume_across_a_checkpoint_matches_the_uninterrupted_run(workspace):
    # dropout on, so the resumed run must also restore the RNG state to match
    common = dict(
        adapter="mtlora",
        mtlora_structure="dtsm",
        lora_dropout=0.1,
        max_steps=10,
        save_strategy="steps",
        save_steps=5,
        chain_export_lora=False,
    )
    axolotl_train(workspace, write_config(workspace, "whole", run_defaults=False, output_dir="./out-whole", **common))
    checkpoint = workspace / "out-whole" / "checkpoint-5"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN" and saved["chain_type"] == "mtlora_dtsm"
    assert any(".lora_core." in key for key in load_file(checkpoint / "adapter_model.safetensors"))
    assert (checkpoint / "optimizer.pt").is_file()

    # the interrupted run: only what was on disk at step 5 carries over
    axolotl_train(
        workspace,
        write_config(
            workspace,
            "resumed",
            run_defaults=False,
            output_dir="./out-resumed",
            resume_from_checkpoint=str(checkpoint),
            **common,
        ),
    )

    whole = load_file(workspace / "out-whole" / "adapter_model.safetensors")
    resumed = load_file(workspace / "out-resumed" / "adapter_model.safetensors")
    halfway = load_file(checkpoint / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        # measured: bit-identical on the CPU; the bound leaves room for reduction order elsewhere
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0, msg=key)
    # steps 6-10 did change the adapter, cores included
    assert all(not torch.equal(whole[key], halfway[key]) for key in whole if ".lora_core." in key)
