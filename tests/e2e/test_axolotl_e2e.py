"""End to end through the real `axolotl` CLI: train, reload, merge-lora, fold export and refusals.

One workspace per module (the demo's tiny random Llama, its tokenizer and alpaca data, built
offline by `prepare_demo`); every run writes its own YAML variant of the demo config and its own
output_dir. The expected values come from outside the code under test: the base model's own
loss, float64 matrix products written out here from the papers' formulas, transformers'
loading of the merged model, and plain PEFT in a process that never imports this package.

Runtime on a 2-core CPU: about 2.5 minutes; independent axolotl runs go two at a time.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    TRAIN_STEPS,
    load_base,
    logged_losses,
    logits_of,
    output_of,
    reference_core,
    require_success,
    run_all,
    saved_core_factors,
    write_config,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import axolotl_chainlora  # noqa: F401  registers LORA_CHAIN with PEFT
from axolotl_chainlora.bnb import Linear4bit as ChainLinear4bit
from axolotl_chainlora.demo import alpaca_text, demo_records, mean_response_loss, run_axolotl
from axolotl_chainlora.merge import EFFICIENT_MERGE_MATCHES_4BIT_TRAINING

# the demo YAML: lora_target_linear on a 2-layer Llama
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
ADAPTED_MODULES = {f"base_model.model.model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}

# run name -> YAML changes on top of the demo config
RUNS = {
    "linchain": {"adapter": "linchain", "linchain_dims": [8, 16, 8]},
    "moslora": {"adapter": "moslora"},
    "mtlora": {"adapter": "mtlora", "mtlora_structure": "ctcm"},
    # no linchain_dims/linchain_n: the documented default LinChain-3-r (three r x r links)
    "linchain-4bit": {"adapter": "linchain", "load_in_4bit": True},
}
CHAIN_TYPE = {"linchain": "linchain", "moslora": "moslora", "mtlora": "mtlora_ctcm", "linchain-4bit": "linchain"}
# shapes of the core factors in the adapter file, in the order weight, weight_1, ... (r = 8)
CORE_SHAPES = {
    "linchain": [(8, 16), (16, 8)],
    "moslora": [(8, 8)],
    "mtlora": [(8, 8), (8, 8)],
    "linchain-4bit": [(8, 8), (8, 8), (8, 8)],
}
FLOAT_RUNS = [name for name, changes in RUNS.items() if not changes.get("load_in_4bit")]
MAX_LOGIT_DIFF = 1e-5
# axolotl's NF4 round trip at merge time against bitsandbytes' dequantization in forward (measured: 5.6e-4; the
# legacy merge onto the unquantized base: 8.5e-3)
NF4_MERGE_TOLERANCE = 1e-3
MIN_LOSS_DROP = 0.2  # measured drop after 20 steps: about 0.48 for every run


# ---------------------------------------------------------------- helpers


def trainable_params_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("trainable params:")]
    assert len(lines) == 1, lines
    return lines[0]


def load_chain(workspace: Path, name: str, quantized: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(load_base(workspace, quantized), workspace / f"out-{name}").eval()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(workspace) -> dict[str, subprocess.CompletedProcess]:
    """`axolotl train` for every run of RUNS (20 steps each)."""
    configs = {name: write_config(workspace, name, **changes) for name, changes in RUNS.items()}
    # the 4-bit run is the slowest: start it first
    order = ["linchain-4bit", *FLOAT_RUNS]
    return run_all(workspace, {f"train-{name}": ["train", configs[name]] for name in order})


def trained_run(trained, name: str) -> subprocess.CompletedProcess:
    result = trained[f"train-{name}"]
    require_success(result, f"axolotl train ({name})")
    return result


@pytest.fixture(scope="module")
def base_logits(workspace, probe) -> torch.Tensor:
    return logits_of(load_base(workspace), probe)


@pytest.fixture(scope="module")
def chain_logits(workspace, trained, probe, base_logits) -> dict[str, torch.Tensor]:
    """Logits of every trained chain adapter on the UNQUANTIZED float32 base."""
    logits = {}
    for name in RUNS:
        trained_run(trained, name)
        logits[name] = logits_of(load_chain(workspace, name), probe)
        # a trained adapter moves the logits: equality with it below is not equality with the base
        assert (logits[name] - base_logits).abs().max().item() > 1e-2, name
    return logits


# ---------------------------------------------------------------- 1. training


@pytest.mark.parametrize("name", list(RUNS))
def test_train_saves_a_chain_adapter_that_lowers_the_loss(workspace, trained, name):
    result = trained_run(trained, name)
    losses = logged_losses(output_of(result))
    assert len(losses) == TRAIN_STEPS, losses
    out = workspace / f"out-{name}"

    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN"
    assert saved["chain_type"] == CHAIN_TYPE[name]
    assert saved["chain_dims"] == RUNS[name].get("linchain_dims")
    assert (saved["r"], saved["lora_alpha"]) == (8, 16)

    tensors = load_file(out / "adapter_model.safetensors")
    modules = {key.split(".lora_")[0] for key in tensors}
    assert modules == ADAPTED_MODULES  # 7 projections x 2 layers, nothing else
    for module in ADAPTED_MODULES:
        assert [tuple(f.shape) for f in saved_core_factors(tensors, module)] == CORE_SHAPES[name], module
        assert tensors[f"{module}.lora_B.weight"].abs().max() > 0  # B starts at zero: it was trained

    # the loss of the model it was trained on: NF4 base for the 4-bit run
    quantized = bool(RUNS[name].get("load_in_4bit"))
    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    records = demo_records()[:32]
    base_loss = mean_response_loss(load_base(workspace, quantized), tokenizer, records)
    trained_loss = mean_response_loss(load_chain(workspace, name, quantized), tokenizer, records)
    print(f"{name}: response loss base {base_loss:.4f} -> trained {trained_loss:.4f}")
    assert trained_loss < base_loss - MIN_LOSS_DROP


def test_4bit_run_trained_on_an_nf4_base(workspace, trained):
    """What is checked: axolotl saves the loaded model's config beside the adapter ("Pre-saving model
    config" in the log); transformers puts a quantization_config in it only when its bitsandbytes
    quantizer loaded the model. The float run's saved config has none. The train log itself shows
    only the cfg dump (model_kwargs.quantization_config, what the plugin asked for), so it is not
    used. (The plugin also refuses to train when no bnb Linear4bit layer is present, but that is
    the code under test.) Then the adapter reloads onto an NF4 base as the chain's 4-bit layer."""
    trained_run(trained, "linchain-4bit")
    trained_run(trained, "linchain")
    model_config = json.loads((workspace / "out-linchain-4bit" / "config.json").read_text())
    quantization = model_config.get("quantization_config")
    assert quantization, "the 4-bit run's trained model has no quantization_config"
    assert quantization["quant_method"] == "bitsandbytes"
    assert quantization["load_in_4bit"] is True and quantization["bnb_4bit_quant_type"] == "nf4"
    assert "quantization_config" not in json.loads((workspace / "out-linchain" / "config.json").read_text())
    # that config.json is the one this run wrote from its loaded model, before training
    assert "Pre-saving model config to ./out-linchain-4bit" in output_of(trained["train-linchain-4bit"])

    import bitsandbytes as bnb

    model = load_chain(workspace, "linchain-4bit", quantized=True)
    adapted = {name: module for name, module in model.named_modules() if name in ADAPTED_MODULES}
    assert len(adapted) == len(ADAPTED_MODULES)
    for name, module in adapted.items():
        assert isinstance(module, ChainLinear4bit), (name, type(module))
        assert isinstance(module.get_base_layer(), bnb.nn.Linear4bit), name


# ---------------------------------------------------------------- 2. reload


@pytest.mark.parametrize("name", list(RUNS))
def test_reload_is_deterministic_and_matches_float64_reference(workspace, trained, probe, name):
    trained_run(trained, name)
    first, second = load_chain(workspace, name), load_chain(workspace, name)
    assert torch.equal(logits_of(first, probe), logits_of(second, probe))

    # one layer, recomputed from the files: y = W0 x + s * B @ T @ A @ x in float64
    module = "base_model.model.model.layers.1.mlp.down_proj"
    tensors = load_file(workspace / f"out-{name}" / "adapter_model.safetensors")
    A = tensors[f"{module}.lora_A.weight"].double()
    B = tensors[f"{module}.lora_B.weight"].double()
    T = reference_core(CHAIN_TYPE[name], saved_core_factors(tensors, module))
    config = yaml.safe_load((workspace / f"{name}.yml").read_text())
    s = config["lora_alpha"] / config["lora_r"]
    base = AutoModelForCausalLM.from_pretrained(workspace / "base", dtype=torch.float32)
    W0 = base.model.layers[1].mlp.down_proj.weight.double()

    x = torch.randn(3, 5, W0.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x.double() @ W0.T + s * x.double() @ (B @ T @ A).T
    layer = first.get_submodule(module)
    with torch.no_grad():
        got = layer(x)
    diff = (got.double() - expected).abs().max().item()
    print(f"{name}: reloaded layer vs float64 reference: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # the core matters: plain LoRA (T = I) on the same A and B is far off
    without_core = x.double() @ W0.T + s * x.double() @ (B @ A).T
    assert (without_core - expected).abs().max().item() > 1e-3


# ---------------------------------------------------------------- 3. merge-lora


@pytest.fixture(scope="module")
def merges(workspace, trained) -> dict[str, subprocess.CompletedProcess]:
    """merge-lora of every run (axolotl's default, memory-efficient merge), of the 4-bit run by the legacy merge,
    and of the linchain adapter from a YAML that says adapter: lora (output_dir read by default, and lora_model_dir
    given on the command line, refused); each on its own copy of the adapter, so that its merged/ is its own."""
    for name in RUNS:
        trained_run(trained, name)
    for copy, name in (("4bit-legacy", "linchain-4bit"), ("as-lora", "linchain")):
        shutil.copytree(workspace / f"out-{name}", workspace / f"out-{copy}", ignore=shutil.ignore_patterns("merged"))
    jobs = {f"merge-{name}": ["merge-lora", f"{name}.yml"] for name in RUNS}
    legacy = write_config(workspace, "4bit-legacy", **RUNS["linchain-4bit"], merge_method="legacy")
    jobs["merge-4bit-legacy"] = ["merge-lora", legacy]
    jobs["merge-as-lora"] = ["merge-lora", write_config(workspace, "as-lora", adapter="lora", chain_export_lora=None)]
    as_lora_dir = write_config(workspace, "as-lora-dir", adapter="lora", chain_export_lora=None)
    jobs["merge-as-lora-dir"] = ["merge-lora", as_lora_dir, "--lora-model-dir", "./out-linchain"]
    return run_all(workspace, jobs)


def merged_logits(workspace, merges, probe, name: str) -> torch.Tensor:
    require_success(merges[f"merge-{name}"], f"axolotl merge-lora ({name})")
    merged_dir = workspace / f"out-{name}" / "merged"
    # merge-lora loads the base unquantized, also for the 4-bit run: the merged model is plain float
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any(".lora_" in key for key in merged.state_dict())
    return logits_of(merged, probe)


@pytest.mark.slow  # alone, with the train and merge-lora runs it needs: about 80 s
@pytest.mark.parametrize("name", [*FLOAT_RUNS, "as-lora"])
def test_merge_lora_gives_the_adapter_logits(workspace, merges, chain_logits, probe, name):
    """axolotl's memory-efficient merge of the plain-LoRA fold; `as-lora`: the linchain adapter merged from a YAML
    that says adapter: lora (axolotl alone would add B A from the file, without the core)."""
    # chain_logits: the adapter applied to the unquantized float32 base
    diff = (merged_logits(workspace, merges, probe, name) - chain_logits[name.replace("as-lora", "linchain")]).abs()
    print(f"{name}: merged vs adapter logits: max abs diff {diff.max().item():.2e}")
    assert diff.max().item() <= MAX_LOGIT_DIFF
    if name == "as-lora" or EFFICIENT_MERGE_MATCHES_4BIT_TRAINING:  # else the chain adapters' default is legacy
        assert "is a chain adapter: merging its exact plain-LoRA fold" in output_of(merges[f"merge-{name}"])


@pytest.mark.slow  # alone, with the train and merge-lora runs it needs: about 80 s
def test_merge_after_4bit_training_gives_the_model_that_was_trained(workspace, merges, chain_logits, probe):
    """The default merge rounds the base through NF4 as training saw it (axolotl's qlora merge), so the merged
    model is the trained one: the adapter on the NF4 base. The legacy merge (the negative control) adds the same
    update to the unquantized base: it gives the adapter on that base instead, and misses the trained model. On
    axolotl < 0.21, whose NF4 round trip also rounds the embeddings and head, the default stays the legacy merge."""
    trained_model = logits_of(load_chain(workspace, "linchain-4bit", quantized=True), probe)
    merged = merged_logits(workspace, merges, probe, "linchain-4bit")
    legacy = merged_logits(workspace, merges, probe, "4bit-legacy")
    to_trained = (merged - trained_model).abs().max().item()
    legacy_to_trained = (legacy - trained_model).abs().max().item()
    legacy_to_unquantized = (legacy - chain_logits["linchain-4bit"]).abs().max().item()
    print(f"linchain-4bit: merged vs trained (NF4 base + adapter) logits: max abs diff {to_trained:.2e}; legacy merge "
          f"vs trained {legacy_to_trained:.2e}, vs the adapter on the unquantized base {legacy_to_unquantized:.2e}")
    assert legacy_to_unquantized <= MAX_LOGIT_DIFF
    if not EFFICIENT_MERGE_MATCHES_4BIT_TRAINING:
        assert (merged - legacy).abs().max().item() <= MAX_LOGIT_DIFF
        return
    assert to_trained <= NF4_MERGE_TOLERANCE and legacy_to_trained > 5 * to_trained


@pytest.mark.slow  # alone, with the train and merge-lora runs it needs: about 80 s
def test_merge_lora_refuses_a_lora_yaml_given_a_chain_adapter_dir(workspace, merges):
    result = merges["merge-as-lora-dir"]
    assert result.returncode != 0
    assert "lora_model_dir=./out-linchain holds a chain adapter (peft_type LORA_CHAIN" in output_of(result)
    assert not (workspace / "out-as-lora-dir").exists()


# ---------------------------------------------------------------- 4. plain-LoRA fold in plain PEFT

PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    workspace, names = sys.argv[1], json.loads(sys.argv[2])
    probe = torch.load(f"{workspace}/probe.pt")
    logits = {}
    for name in names:
        base = AutoModelForCausalLM.from_pretrained(f"{workspace}/base", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, f"{workspace}/out-{name}/plain_lora").eval()
        assert type(model.peft_config["default"]) is LoraConfig, type(model.peft_config["default"])
        with torch.no_grad():
            logits[name] = model(**probe).logits.float()
    torch.save(logits, f"{workspace}/plain_logits.pt")
    print("chainlora modules loaded:", sorted(m for m in sys.modules if m.startswith("axolotl_chainlora")))
    assert not any(m.startswith("axolotl_chainlora") for m in sys.modules), "axolotl_chainlora was imported"
    """
)


@pytest.fixture(scope="module")
def plain_peft_logits(workspace, trained, probe) -> dict[str, torch.Tensor]:
    for name in RUNS:
        trained_run(trained, name)
    torch.save(probe, workspace / "probe.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_SCRIPT, str(workspace), json.dumps(list(RUNS))],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, output_of(result)[-4000:]
    assert "chainlora modules loaded: []" in result.stdout
    return torch.load(workspace / "plain_logits.pt")


@pytest.mark.parametrize("name", list(RUNS))
def test_plain_lora_fold_loads_in_plain_peft_with_the_chain_logits(
    workspace, trained, plain_peft_logits, chain_logits, name
):
    fold = workspace / f"out-{name}" / "plain_lora"
    fold_config = json.loads((fold / "adapter_config.json").read_text())
    assert fold_config["peft_type"] == "LORA"
    assert not any("chain" in key for key in fold_config)
    assert not any(".lora_core." in key for key in load_file(fold / "adapter_model.safetensors"))
    diff = (plain_peft_logits[name] - chain_logits[name]).abs().max().item()
    print(f"{name}: plain-PEFT fold vs chain adapter logits: max abs diff {diff:.2e}")
    assert diff <= MAX_LOGIT_DIFF


# ---------------------------------------------------------------- 6. bad configs fail before loading a model

BAD_CONFIGS = {
    "no-structure": ({"adapter": "mtlora"}, "mtlora_structure"),
    "bad-dims": ({"adapter": "linchain", "linchain_dims": [8, 16, 4]}, "linchain_dims"),
    # axolotl's LoRA kernels, where on, would compute B A without the core
    "lora-on-chain": ({"adapter": "lora", "chain_export_lora": None, "lora_model_dir": "./out-linchain"},
                      "lora_model_dir"),
}


@pytest.fixture(scope="module")
def bad_config_runs(workspace, trained) -> dict[str, subprocess.CompletedProcess]:
    trained_run(trained, "linchain")
    jobs = {
        f"train-{name}": ["train", write_config(workspace, name, **changes)]
        for name, (changes, _) in BAD_CONFIGS.items()
    }
    return run_all(workspace, jobs)


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_fails_before_any_model_is_loaded(workspace, bad_config_runs, name):
    result = bad_config_runs[f"train-{name}"]
    output = output_of(result)
    key = BAD_CONFIGS[name][1]
    assert result.returncode != 0
    assert re.search(rf"Value error, .*{key}", output), output[-3000:]
    assert not (workspace / f"out-{name}").exists()
    # signs of a loaded model in a training log: weight loading, the target scan, the PEFT summary
    for sign in ("Loading weights", "found linear modules", "trainable params"):
        assert sign not in output, sign


# ---------------------------------------------------------------- 7. lora_model_dir


@pytest.fixture(scope="module")
def lora_model_dir_runs(workspace, trained) -> dict[str, subprocess.CompletedProcess]:
    trained_run(trained, "linchain")
    resume = write_config(
        workspace, "resume", **RUNS["linchain"], lora_model_dir="./out-linchain", max_steps=5, learning_rate=0.0
    )
    from_plain = write_config(
        workspace, "from-plain", **RUNS["linchain"], lora_model_dir="./out-linchain/plain_lora", max_steps=5
    )
    return run_all(workspace, {"train-resume": ["train", resume], "train-from-plain": ["train", from_plain]})


@pytest.mark.slow  # alone, with the two rounds of train runs it needs: about 70 s
def test_training_from_lora_model_dir_starts_at_the_saved_adapter(workspace, trained, lora_model_dir_runs):
    """learning_rate 0.0 (AdamW without weight decay then changes nothing), so the adapter this run saves
    is the one it started from: it must equal the saved adapter bit for bit. A fresh adapter (B = 0,
    new random A and core) could not. The loaded adapter is trainable (same trainable-params line as the
    fresh run), and the first logged loss, taken before any update, is the trained adapter's: well
    below the fresh run's first loss, which is the base model's (B = 0)."""
    result = lora_model_dir_runs["train-resume"]
    require_success(result, "axolotl train with lora_model_dir")
    fresh = trained_run(trained, "linchain")

    saved = load_file(workspace / "out-linchain" / "adapter_model.safetensors")
    resumed = load_file(workspace / "out-resume" / "adapter_model.safetensors")
    assert saved.keys() == resumed.keys()
    for key in saved:
        assert torch.equal(saved[key], resumed[key]), key
    assert json.loads((workspace / "out-resume" / "adapter_config.json").read_text())["peft_type"] == "LORA_CHAIN"

    assert trainable_params_line(output_of(result)) == trainable_params_line(output_of(fresh))
    resumed_losses, fresh_losses = logged_losses(output_of(result)), logged_losses(output_of(fresh))
    assert len(resumed_losses) == 5
    print(f"first logged loss: fresh {fresh_losses[0]}, from lora_model_dir {resumed_losses[0]}")
    assert resumed_losses[0] < fresh_losses[0] - MIN_LOSS_DROP


@pytest.mark.slow  # alone, with the two rounds of train runs it needs: about 70 s
def test_lora_model_dir_with_a_plain_lora_adapter_is_refused(workspace, lora_model_dir_runs):
    result = lora_model_dir_runs["train-from-plain"]
    output = output_of(result)
    assert result.returncode != 0
    assert "lora_model_dir=./out-linchain/plain_lora holds a LoraConfig adapter, not adapter: linchain" in output, (
        output[-3000:]
    )
    # refused while the YAML is validated: no model was loaded, nothing was written
    assert "Loading weights" not in output and not (workspace / "out-from-plain").exists()


@pytest.mark.slow  # alone, with the train runs it needs: about 70 s
def test_axolotl_inference_generates_with_the_trained_adapter(workspace, trained):
    trained_run(trained, "linchain")
    prompt = alpaca_text({"instruction": "Add 3 and 4.", "input": "", "output": ""})
    result = run_axolotl(
        ["inference", "linchain.yml", "--lora-model-dir", "./out-linchain"], workspace, "inference.log", stdin=prompt
    )
    require_success(result, "axolotl inference")
    output = output_of(result)
    # the chain adapter was loaded by the plugin (the trainable-parameter count includes the cores)
    assert trainable_params_line(output) == trainable_params_line(output_of(trained["train-linchain"]))
    # and a completion came back after the prompt: text before the end-of-sequence token or the closing rule (it may
    # start on a new line when the model's first token is one)
    completion = re.search(r"### Response:(.*?)(?:</s>|\n={20})", output, re.DOTALL)
    assert completion and completion.group(1).strip(), output[-2000:]
