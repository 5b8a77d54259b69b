"""The README's main command, end to end: `axolotl train` and `axolotl merge-lora` on the tiny local model."""

from __future__ import annotations

import json

from axolotl_chainlora.cli import main


def test_demo_trains_through_axolotl_and_exports_exactly(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", str(out)]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["trained_response_loss"] < results["base_response_loss"] - 0.2
    assert results["fold_max_abs_diff"] <= 1e-5
    assert results["merge_max_abs_diff"] <= 1e-5
    saved = json.loads((out / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN" and saved["chain_type"] == "linchain"
    assert json.loads((out / "out" / "plain_lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "out" / "merged" / "model.safetensors").is_file()
    # the plugin says what it changed, in axolotl's own log
    train_log = (out / "train.log").read_text()
    assert "axolotl's LoRA kernels are off (no CUDA device" in train_log and "folded into a plain LoRA" in train_log
    # a second run never overwrites a finished one
    assert main(["demo", str(out)]) == 2
