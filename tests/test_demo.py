"""The README's main command, end to end: train on the tiny local model, save, fold, merge."""

from __future__ import annotations

import json

from axolotl_chainlora.cli import main


def test_demo_trains_and_exports_exactly(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--steps", "20"]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["last_loss"] < results["first_loss"] - 0.1
    assert results["fold_max_abs_diff"] <= 1e-5
    assert results["merge_max_abs_diff"] <= 1e-5
    for produced in (
        "base/tokenizer.json",
        "adapter/adapter_config.json",
        "lora/adapter_model.safetensors",
        "merged/model.safetensors",
    ):
        assert (out / produced).is_file()
    # a second run never overwrites a finished one
    assert main(["demo", str(out)]) == 2
