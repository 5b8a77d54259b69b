"""The `axolotl-chainlora` command: quiet on success, one line naming the file on a damaged adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WEIGHTS, offline_env, run_cli
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_chainlora import ChainLoraConfig
from axolotl_chainlora.cli import main

CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    config = ChainLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], chain_type="linchain")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        pytest.param(["--version"], "axolotl-chainlora 0.1.0", id="version"),
        pytest.param(["--help"], "usage: axolotl-chainlora", id="help"),
        pytest.param(["export", "--help"], "usage: axolotl-chainlora export", id="export-help"),
    ],
)
def test_help_and_version_print_nothing_else(args, stdout, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith(stdout)
    assert result.stderr == ""


@pytest.mark.parametrize("merge", [False, True], ids=["fold", "merge"])
def test_export_prints_one_line_and_no_warnings(adapter_dir, tiny_llama_dir, tmp_path, merge):
    """No progress bar, no DeepSpeed notice (the merge's save_pretrained imports DeepSpeed): the command's line only."""
    out = tmp_path / "out"
    args = ["--merge", "--base-model", str(tiny_llama_dir)] if merge else []
    result = run_cli("export", str(adapter_dir), str(out), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = "the merged model" if merge else "a plain LoRA adapter"
    assert result.stdout == f"wrote {written} to {out}\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("imports", "notice"),
    [
        pytest.param("import peft, bitsandbytes", "kernels-community", id="bitsandbytes"),
        # transformers' save_pretrained imports DeepSpeed where it is installed: the demo and `export --merge` do
        pytest.param("import deepspeed", "Setting accelerator to CPU", id="deepspeed"),
    ],
)
def test_without_the_package_the_same_imports_are_noisy(imports, notice, tmp_path):
    """The control: what the command hides is real noise of these libraries' imports on this machine."""
    result = subprocess.run(
        [sys.executable, "-c", imports], cwd=tmp_path, env=offline_env(), capture_output=True, text=True
    )
    assert result.returncode == 0
    assert notice in result.stdout + result.stderr


def damaged_copy(adapter_dir: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    copy.mkdir()
    for name in (CONFIG, WEIGHTS):
        (copy / name).write_bytes((adapter_dir / name).read_bytes())
    damage(copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "truncated-weights": (lambda d: truncate(d / WEIGHTS), WEIGHTS, "truncated or damaged"),
    "garbage-weights": (
        lambda d: (d / WEIGHTS).write_bytes(b"not a safetensors file"),
        WEIGHTS,
        "truncated or damaged",
    ),
    "missing-weights": (lambda d: (d / WEIGHTS).unlink(), WEIGHTS, "not found"),
    "missing-config": (lambda d: (d / CONFIG).unlink(), CONFIG, "not found"),
    "malformed-config": (lambda d: truncate(d / CONFIG), CONFIG, "is not a readable PEFT adapter config"),
    "config-without-peft-type": (
        lambda d: (d / CONFIG).write_text(json.dumps({"r": 4})),
        CONFIG,
        "is not a readable PEFT adapter config",
    ),
}


@pytest.mark.parametrize("merge", [False, True], ids=["fold", "merge"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_adapter_gives_one_line_naming_the_file(adapter_dir, tiny_llama_dir, tmp_path, capsys, damage, merge):
    change, file_name, reason = DAMAGES[damage]
    damaged = damaged_copy(adapter_dir, tmp_path, change)
    args = ["export", str(damaged), str(tmp_path / "out")]
    args += ["--merge", "--base-model", tiny_llama_dir] if merge else []
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("axolotl-chainlora export: error: "), error
    assert str(damaged / file_name) in error and reason in error
    assert not (tmp_path / "out").exists()


def test_the_undamaged_copy_exports(adapter_dir, tmp_path, capsys):
    """The control for the damages above: the same copy, unchanged, folds."""
    copy = damaged_copy(adapter_dir, tmp_path, lambda d: None)
    assert main(["export", str(copy), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / WEIGHTS).is_file()
