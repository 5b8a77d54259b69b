"""The README's main command, end to end: `axolotl train` and `axolotl merge-lora` on the tiny local model."""

from __future__ import annotations

import json

from helpers import run_cli


def test_demo_trains_through_axolotl_and_exports_exactly(tmp_path):
    """The README's command as a user runs it; it prints its results and one closing line, nothing else."""
    result = run_cli("demo", "demo", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo"
    results = json.loads((out / "demo_results.json").read_text())
    printed_results, closing_line = result.stdout.rsplit("}\n", 1)
    assert json.loads(printed_results + "}") == results
    assert closing_line.startswith("wrote the base model") and closing_line.count("\n") == 1
    assert result.stderr == ""
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
    again = run_cli("demo", "demo", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("axolotl-chainlora demo: error: ")
