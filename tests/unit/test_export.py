"""Export of chain adapters: fold_to_lora, merge_to_full_model and the `axolotl-chainlora export` command.

Every check compares against something computed independently of the export code: plain PEFT
(in a process that never imports axolotl_chainlora), the unfolded chain model, transformers'
own loader, or the fold/merge math written out here in float64.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    ALPHA,
    CLI,
    SCALE,
    TARGETS,
    WEIGHTS,
    R,
    chain_model,
    logits_of,
    make_input_ids,
    offline_env,
    randomize_adapters,
    reference_core,
    saved_core_factors,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from axolotl_chainlora import ChainLoraConfig, fold_to_lora, merge_to_full_model
from axolotl_chainlora.cli import main as cli_main

# written out here rather than imported, so a chain type dropped from the package fails these tests: each adapter's
# chain type and ChainLoraConfig fields. "linchain" widens in the middle (LINCHAIN_DIMS); "linchain-3" is the
# default LinChain-3-r, whose square factors multiply in any order, so only their values tell W1 W2 W3 from W3 W2 W1
ADAPTERS = {
    "moslora": ("moslora", {}),
    "linchain": ("linchain", {}),
    "mtlora_shim": ("mtlora_shim", {}),
    "mtlora_icfm": ("mtlora_icfm", {}),
    "mtlora_ctcm": ("mtlora_ctcm", {}),
    "mtlora_dtsm": ("mtlora_dtsm", {}),
    "linchain-3": ("linchain", {"chain_dims": None}),
}
TOL = 1e-5
Q_PROJ_0 = "base_model.model.model.layers.0.self_attn.q_proj"
SUBPROCESS_TIMEOUT = 300


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def run_concurrently(commands: dict[str, list[str]], log_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands in parallel (each pays the torch import), output to files so no pipe fills up."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running = {}
    for name, command in commands.items():
        stdout, stderr = open(log_dir / f"{name}.out", "w"), open(log_dir / f"{name}.err", "w")
        # several of these run at once on few cores
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=offline_env(OMP_NUM_THREADS="1"))
        running[name] = (process, stdout, stderr)
    results = {}
    for name, (process, stdout, stderr) in running.items():
        try:
            process.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            stdout.close()
            stderr.close()
        results[name] = subprocess.CompletedProcess(
            process.args,
            process.returncode,
            (log_dir / f"{name}.out").read_text(),
            (log_dir / f"{name}.err").read_text(),
        )
    return results


def tail(result: subprocess.CompletedProcess, chars: int = 3000) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-chars:]}\nstderr:\n{result.stderr[-chars:]}"


# --- independent math ---------------------------------------------------------------------------


EXPECTED_FACTOR_SHAPES = {
    "moslora": [(R, R)],
    "linchain": [(4, 8), (8, 4)],
    "mtlora_shim": [(R, R)],
    "mtlora_icfm": [(R, R)],
    "mtlora_ctcm": [(R, R), (R, R)],
    "mtlora_dtsm": [(R, R), (R, R)],
    "linchain-3": [(R, R)] * 3,
}


# --- shared chain adapters on tiny llama --------------------------------------------------------


@dataclass
class ChainAdapter:
    chain_type: str
    model: PeftModel
    adapter_dir: Path
    fold_dir: Path
    logits: torch.Tensor  # the chain model's logits on make_input_ids()


@pytest.fixture(scope="module")
def base_llama_logits(tiny_llama_dir) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), make_input_ids())


@pytest.fixture(scope="module")
def llama_chains(tiny_llama_dir, base_llama_logits, tmp_path_factory) -> dict[str, ChainAdapter]:
    """One saved and folded chain adapter per entry of ADAPTERS, on a base loaded from the saved tiny llama."""
    root = tmp_path_factory.mktemp("llama-chains")
    chains = {}
    for seed, (name, (chain_type, fields)) in enumerate(ADAPTERS.items(), start=3):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model = chain_model(chain_type, base, seed=seed, task_type="CAUSAL_LM", **fields)
        assert model.peft_config["default"].base_model_name_or_path == tiny_llama_dir
        adapter_dir = root / name
        model.save_pretrained(str(adapter_dir))
        fold_dir = fold_to_lora(adapter_dir, root / f"{name}-folded")
        chains[name] = ChainAdapter(chain_type, model, adapter_dir, Path(fold_dir), logits_of(model, make_input_ids()))
        # the adapter must really move the outputs, or logit comparisons below prove nothing
        assert max_diff(chains[name].logits, base_llama_logits) > 0.05, name
    return chains


PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    base_dir, jobs_file, ids_file, out_file = sys.argv[1:]
    input_ids = torch.load(ids_file)
    results = {}
    for name, adapter_dir in json.load(open(jobs_file)).items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        n_lora_layers = sum(isinstance(m, LoraLinear) for m in model.modules())
        with torch.no_grad():
            results[name] = (model(input_ids=input_ids).logits, n_lora_layers)
    torch.save(results, out_file)
    imported = sorted(m for m in sys.modules if m.startswith("axolotl"))
    assert "axolotl_chainlora" not in sys.modules, f"plain PEFT process imported {imported}"
    print("PLAIN_PEFT_OK", imported)
    """
)


@pytest.fixture(scope="module")
def plain_peft_fold_logits(llama_chains, tiny_llama_dir, tmp_path_factory) -> dict[str, tuple[torch.Tensor, int]]:
    """Logits of every folded adapter, loaded by plain PEFT in one process without axolotl_chainlora."""
    work = tmp_path_factory.mktemp("plain-peft")
    (work / "load.py").write_text(PLAIN_PEFT_SCRIPT)
    (work / "jobs.json").write_text(json.dumps({name: str(c.fold_dir) for name, c in llama_chains.items()}))
    torch.save(make_input_ids(), work / "ids.pt")
    command = [sys.executable, str(work / "load.py"), tiny_llama_dir, str(work / "jobs.json"), str(work / "ids.pt")]
    result = run_concurrently({"plain": command + [str(work / "logits.pt")]}, work)["plain"]
    assert result.returncode == 0, tail(result)
    assert "PLAIN_PEFT_OK []" in result.stdout, tail(result)
    return torch.load(work / "logits.pt")


# --- 1. the fold loads in plain PEFT with the chain model's outputs -----------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_fold_loads_in_plain_peft_with_same_logits(name, llama_chains, plain_peft_fold_logits):
    chain = llama_chains[name]
    logits, n_lora_layers = plain_peft_fold_logits[name]
    # 2 layers x (q_proj, v_proj, down_proj), all loaded as PEFT's stock LoRA Linear
    assert n_lora_layers == 6
    diff = max_diff(logits, chain.logits)
    print(f"{name}: plain PEFT fold vs chain model max |diff| = {diff:.3g}")
    assert diff <= TOL

    config = json.loads((chain.fold_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == R and config["lora_alpha"] == ALPHA
    assert not any(key.startswith("chain_") for key in config), "chain fields left in a plain LoRA config"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    folded = load_file(str(chain.fold_dir / WEIGHTS))
    assert not [key for key in folded if "lora_core" in key]
    assert len([key for key in folded if key.endswith(".lora_A.weight")]) == 6
    assert all(v.shape == (R, 32) or v.shape == (R, 64) for k, v in folded.items() if k.endswith("lora_A.weight"))


# --- 2. the fold math, written out independently ------------------------------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_folded_A_is_core_times_A(name, llama_chains):
    chain = llama_chains[name]
    saved = load_file(str(chain.adapter_dir / WEIGHTS))
    folded = load_file(str(chain.fold_dir / WEIGHTS))
    assert set(folded) == {key for key in saved if ".lora_core." not in key}

    module_keys = sorted({key.split(".lora_core.")[0] for key in saved if ".lora_core." in key})
    assert len(module_keys) == 6 and Q_PROJ_0 in module_keys
    for module_key in module_keys:
        factors = saved_core_factors(saved, module_key)
        assert [tuple(f.shape) for f in factors] == EXPECTED_FACTOR_SHAPES[name]
        T = reference_core(chain.chain_type, factors)
        A = saved[f"{module_key}.lora_A.weight"].double()
        folded_A = folded[f"{module_key}.lora_A.weight"]
        assert folded_A.dtype == torch.float32 and folded_A.shape == A.shape
        torch.testing.assert_close(folded_A.double(), T @ A, rtol=1e-6, atol=1e-7)
        # the core is not the identity, so an unfolded A would fail the check above
        assert (T @ A - A).abs().max() > 0.1
        if name == "linchain-3":  # and the factors do not commute, so a reversed product would fail it too
            assert (T @ A - reference_core("linchain", factors[::-1]) @ A).abs().max() > 1e-3
        assert torch.equal(folded[f"{module_key}.lora_B.weight"], saved[f"{module_key}.lora_B.weight"])


# --- 3. folding the in-memory model gives the same adapter --------------------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_fold_from_model_equals_fold_from_dir(name, llama_chains, tmp_path):
    chain = llama_chains[name]
    out = fold_to_lora(chain.model, tmp_path / "from-model")
    assert Path(out) == tmp_path / "from-model"
    from_model = load_file(str(tmp_path / "from-model" / WEIGHTS))
    from_dir = load_file(str(chain.fold_dir / WEIGHTS))
    assert set(from_model) == set(from_dir)
    for key in from_dir:
        torch.testing.assert_close(from_model[key], from_dir[key], rtol=0, atol=0, msg=key)

    config_model = json.loads((tmp_path / "from-model" / "adapter_config.json").read_text())
    config_dir = json.loads((chain.fold_dir / "adapter_config.json").read_text())
    # the in-memory config is in training mode, the saved one in inference mode
    config_model.pop("inference_mode"), config_dir.pop("inference_mode")
    # PEFT keeps target_modules as a set and writes it in the set's order, which depends on how it was built
    assert set(config_model.pop("target_modules")) == set(config_dir.pop("target_modules"))
    assert config_model == config_dir


# --- 4. GPT-2's fused qkv ------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora-scale", "rslora"])
def test_fused_gpt2_icfm_fold_and_reference(tiny_gpt2_dir, tmp_path, input_ids, use_rslora):
    """Without COLA, a fused projection is the one place where the fold changes the rank (r to 3 r), so the
    only place where it must rescale B by s_r / s_3r: 3 with alpha / r, sqrt(3) with rsLoRA's alpha / sqrt(r)."""
    scale = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    config = ChainLoraConfig(
        r=R,
        lora_alpha=ALPHA,
        use_rslora=use_rslora,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        chain_type="mtlora_icfm",
        chain_fused_splits={"c_attn": 3},
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), config)
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(str(tmp_path / "chain"))

    # one c_attn layer against base + s * blockdiag(B_q, B_k, B_v) @ C @ C^T @ A @ x in float64
    seen = {}
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    hook = c_attn.register_forward_hook(lambda module, args, output: seen.update(x=args[0], y=output))
    chain_logits = logits_of(model, input_ids)
    hook.remove()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    base_logits = logits_of(base.eval(), input_ids)
    assert max_diff(chain_logits, base_logits) > 0.05

    saved = load_file(str(tmp_path / "chain" / WEIGHTS))
    key = "base_model.model.transformer.h.0.attn.c_attn"
    A = saved[f"{key}.lora_A.weight"].double()
    B = saved[f"{key}.lora_B.weight"].double()
    (C,) = saved_core_factors(saved, key)
    assert A.shape == (3 * R, 32) and B.shape == (96, R) and C.shape == (3 * R, 3 * R)
    B_q, B_k, B_v = B.split(32, dim=0)
    W, bias = base.transformer.h[0].attn.c_attn.weight.double(), base.transformer.h[0].attn.c_attn.bias.double()
    assert W.shape == (32, 96)  # Conv1D: in x out
    x = seen["x"].double()
    delta = torch.block_diag(B_q, B_k, B_v) @ (C @ C.T) @ A
    reference = x @ W + bias + scale * x @ delta.T
    layer_diff = max_diff(seen["y"], reference)
    print(f"gpt2 c_attn layer vs float64 reference max |diff| = {layer_diff:.3g}")
    assert layer_diff <= TOL
    # a shared B (no block structure) would give something else
    assert (x @ (B @ (C @ C.T)[:R, :R] @ A[:R]).T * scale + x @ W + bias - reference).abs().max() > 0.1

    # the fold: rank 3r for the two c_attn, r for the two c_fc; one is the global rank, the other listed by
    # exact name in rank_pattern; loaded by stock PEFT
    fold_to_lora(tmp_path / "chain", tmp_path / "folded")
    folded_config = json.loads((tmp_path / "folded" / "adapter_config.json").read_text())
    assert folded_config["peft_type"] == "LORA" and folded_config["lora_alpha"] == ALPHA
    assert folded_config["use_rslora"] is use_rslora
    ranks = {folded_config["r"], *folded_config["rank_pattern"].values()}
    assert ranks == {R, 3 * R} and len(folded_config["rank_pattern"]) == 2
    folded = load_file(str(tmp_path / "folded" / WEIGHTS))
    assert not [k for k in folded if "lora_core" in k]
    assert folded[f"{key}.lora_B.weight"].shape == (96, 3 * R)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), str(tmp_path / "folded"))
    plain.eval()
    plain_layer = plain.base_model.model.transformer.h[0].attn.c_attn
    assert type(plain_layer).__module__ == "peft.tuners.lora.layer" and not hasattr(plain_layer, "lora_core")
    assert plain_layer.r["default"] == 3 * R
    assert plain.base_model.model.transformer.h[0].mlp.c_fc.r["default"] == R
    diff = max_diff(logits_of(plain, input_ids), chain_logits)
    print(f"gpt2 fused icfm: plain PEFT fold vs chain model max |diff| = {diff:.3g}")
    assert diff <= TOL


# --- 5. plain PEFT refuses an unfolded chain adapter ---------------------------------------------


REFUSE_SCRIPT = textwrap.dedent(
    """
    import sys
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = sys.argv[1:]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    try:
        PeftModel.from_pretrained(base, adapter_dir)
    except BaseException:
        print("axolotl_chainlora imported:", "axolotl_chainlora" in sys.modules, file=sys.stderr)
        raise
    print("LOADED_SILENTLY")
    """
)


def test_plain_peft_refuses_unfolded_chain_adapter(llama_chains, tiny_llama_dir, tmp_path):
    (tmp_path / "load.py").write_text(REFUSE_SCRIPT)
    chain_dir = llama_chains["linchain"].adapter_dir
    assert json.loads((chain_dir / "adapter_config.json").read_text())["peft_type"] == "LORA_CHAIN"
    command = [sys.executable, str(tmp_path / "load.py"), tiny_llama_dir, str(chain_dir)]
    result = run_concurrently({"refuse": command}, tmp_path)["refuse"]
    assert "LOADED_SILENTLY" not in result.stdout, tail(result)
    assert result.returncode != 0, tail(result)
    assert "LORA_CHAIN" in result.stderr, tail(result)
    assert "axolotl_chainlora imported: False" in result.stderr, tail(result)


# --- 6. the command line ------------------------------------------------------------------------


@dataclass
class CliRuns:
    results: dict[str, subprocess.CompletedProcess]
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def cli_runs(llama_chains, tiny_llama_dir, tmp_path_factory) -> CliRuns:
    """The installed `axolotl-chainlora` command, run at once for every case that needs a real process
    (each one imports torch and peft: several seconds)."""
    assert CLI.is_file(), f"{CLI} not installed"
    root = tmp_path_factory.mktemp("cli")
    paths = {"out": root / "out", "existing": root / "existing"}
    paths["out"].mkdir()
    paths["existing"].mkdir()
    (paths["existing"] / "keep.txt").write_text("precious")

    export = [str(CLI), "export"]
    commands = {
        "fold": export + [str(llama_chains["mtlora_ctcm"].adapter_dir), str(paths["out"] / "fold")],
        "merge": export
        + [str(llama_chains["mtlora_dtsm"].adapter_dir), str(paths["out"] / "merge"), "--merge"]
        + ["--base-model", tiny_llama_dir],
        "merge_without_base": export + [str(llama_chains["moslora"].adapter_dir), str(paths["out"] / "nb"), "--merge"],
        "existing": export + [str(llama_chains["moslora"].adapter_dir), str(paths["existing"])],
    }
    return CliRuns(run_concurrently(commands, root / "logs"), paths)


def test_cli_fold(cli_runs, llama_chains, tiny_llama_dir, input_ids):
    result = cli_runs.results["fold"]
    assert result.returncode == 0, tail(result)
    out = cli_runs.paths["out"] / "fold"
    assert str(out) in result.stdout
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(out)).eval()
    assert not any(hasattr(m, "lora_core") for m in plain.modules())
    diff = max_diff(logits_of(plain, input_ids), llama_chains["mtlora_ctcm"].logits)
    print(f"CLI fold (mtlora_ctcm) vs chain model max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_cli_merge(cli_runs, llama_chains, input_ids):
    result = cli_runs.results["merge"]
    assert result.returncode == 0, tail(result)
    out = cli_runs.paths["out"] / "merge"
    assert (out / "model.safetensors").is_file()
    assert not [key for key in load_file(str(out / "model.safetensors")) if "lora" in key]
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not isinstance(merged, PeftModel)
    diff = max_diff(logits_of(merged, input_ids), llama_chains["mtlora_dtsm"].logits)
    print(f"CLI merge (mtlora_dtsm) vs chain model max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_cli_merge_needs_base_model(cli_runs):
    result = cli_runs.results["merge_without_base"]
    assert result.returncode == 2, tail(result)
    assert "--base-model" in result.stderr and "usage:" in result.stderr
    assert not (cli_runs.paths["out"] / "nb").exists()


def test_cli_refuses_existing_output_dir(cli_runs):
    result = cli_runs.results["existing"]
    existing = cli_runs.paths["existing"]
    assert result.returncode == 2, tail(result)
    assert str(existing) in result.stderr and "Traceback" not in result.stderr, tail(result)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "precious"
    assert not [p for p in existing.parent.iterdir() if p.name.startswith(f".{existing.name}.")]


# The remaining bad inputs go through the command's main() in this process (the console script is
# sys.exit(main()), checked above): a process each would cost several seconds.


def test_cli_refuses_plain_lora_adapter(tiny_llama_dir, tmp_path, capsys):
    plain = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    plain.save_pretrained(str(tmp_path / "plain-lora"))
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "plain-lora"), str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert "not a chain adapter" in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "chain_type, core_key",
    [
        ("linchain", f"{Q_PROJ_0}.lora_core.weight_1"),
        ("moslora", f"{Q_PROJ_0}.lora_core.weight"),
    ],
)
def test_cli_refuses_adapter_missing_a_core_tensor(chain_type, core_key, llama_chains, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(llama_chains[chain_type].adapter_dir, damaged)
    tensors = load_file(str(damaged / WEIGHTS))
    del tensors[core_key]
    save_file(tensors, str(damaged / WEIGHTS), metadata={"format": "pt"})

    exit_code = cli_main(["export", str(damaged), str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert not (tmp_path / "out").exists(), f"export wrote a fold of an adapter missing {core_key}"
    assert exit_code == 2
    assert "layers.0.self_attn.q_proj" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"], "temporary directory left behind"


# --- 7. merge_to_full_model in-process -----------------------------------------------------------


def test_merge_of_an_adapter_saved_without_task_type_is_the_base_architecture(tiny_llama_dir, tmp_path, input_ids):
    """No task_type: the merge loads the base as its own class (LlamaForCausalLM), not a bare model without its
    LM head (which a bare AutoModel gave, with PEFT only warning about the adapter's keys)."""
    model = chain_model("moslora")
    assert model.peft_config["default"].task_type is None
    model.save_pretrained(tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(
        merge_to_full_model(tmp_path / "adapter", tiny_llama_dir, tmp_path / "m")
    )
    assert max_diff(logits_of(merged, input_ids), logits_of(model, input_ids)) <= TOL


def test_merge_to_full_model_linchain(llama_chains, tiny_llama_dir, tmp_path, input_ids, base_llama_logits):
    chain = llama_chains["linchain"]
    out = merge_to_full_model(chain.adapter_dir, tiny_llama_dir, tmp_path / "merged")
    assert Path(out) == tmp_path / "merged"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged_tensors = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not [key for key in merged_tensors if "lora" in key]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    diff = max_diff(logits_of(merged, input_ids), chain.logits)
    print(f"merge_to_full_model (linchain) vs chain model max |diff| = {diff:.3g}")
    assert diff <= TOL
    assert max_diff(logits_of(merged, input_ids), base_llama_logits) > 0.05

    # the merged q_proj of layer 0 is W0 + s * B W1 W2 A, computed here in float64
    saved = load_file(str(chain.adapter_dir / WEIGHTS))
    W1, W2 = saved_core_factors(saved, Q_PROJ_0)
    A = saved[f"{Q_PROJ_0}.lora_A.weight"].double()
    B = saved[f"{Q_PROJ_0}.lora_B.weight"].double()
    W0 = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].double()
    expected = W0 + SCALE * B @ W1 @ W2 @ A
    torch.testing.assert_close(
        merged_tensors["model.layers.0.self_attn.q_proj.weight"].double(), expected, rtol=1e-5, atol=1e-5
    )
