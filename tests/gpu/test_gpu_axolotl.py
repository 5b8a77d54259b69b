"""The main use on one CUDA GPU, through the real `axolotl train` and `axolotl merge-lora`.

4-bit QLoRA chain adapters (NF4, double quantization, bf16 compute) with SDPA, sample packing and
gradient checkpointing, axolotl's LoRA kernels on (the plugin turns them on there) and off; an 8-bit
base; bf16 bases under SDPA and flash attention; COLA on a 4-bit and a bf16 base; DeepSpeed ZeRO-2
and ZeRO-3 and FSDP2 on one GPU. The runs go four at a time. Each comparison prints a `MEASURED`
line (scripts/gpu_check.sh collects them): the tolerances below were set from bf16's rounding
before any GPU run, and are to be tightened to the measured figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import bitsandbytes as bnb
import pytest
import torch
from helpers import KERNELS, load_base, logged_losses, measured, output_of, require_success, run_all, write_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import axolotl_chainlora  # noqa: F401  registers LORA_CHAIN with PEFT
from axolotl_chainlora.demo import alpaca_text, demo_records
from axolotl_chainlora.export import ADAPTER_WEIGHTS
from axolotl_chainlora.layer import ChainLoraLayer

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
KERNELS_OFF = dict.fromkeys(KERNELS, False)
ZERO = {
    "zero_optimization": {"stage": None, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    },
}

# run name -> YAML changes on top of the GPU workspace's config (bf16, SDPA, packing, checkpointing)
RUNS = {
    "qlora-linchain": {"adapter": "linchain", "load_in_4bit": True},
    "qlora-linchain-unfused": {"adapter": "linchain", "load_in_4bit": True, **KERNELS_OFF},
    "qlora-moslora": {"adapter": "moslora", "load_in_4bit": True},
    "qlora-mtlora": {"adapter": "mtlora", "mtlora_structure": "icfm", "load_in_4bit": True},
    "8bit-moslora": {"adapter": "moslora", "load_in_8bit": True},
    "bf16-linchain": {"adapter": "linchain"},
    "bf16-moslora": {"adapter": "moslora"},
    "bf16-mtlora": {"adapter": "mtlora", "mtlora_structure": "ctcm"},
    "qlora-cola": {"adapter": "qlora", "load_in_4bit": True, "cola_links": 3, "lora_dropout": 0.0},
    "bf16-cola": {"adapter": "linchain", "cola_links": 3},
}
if HAS_FLASH_ATTN:
    RUNS["flash-linchain"] = {"adapter": "linchain", "sdp_attention": None, "flash_attention": True}
# one process each, on its own rendezvous port
# COLA on each engine, with a rank step-down: two knots tie links of ranks 8 and 4
STEP_DOWN = {"cola_links": 3, "cola_ranks": [8, 4, 4]}
DISTRIBUTED = {
    "fsdp2-linchain": {"adapter": "linchain", **FSDP2},
    "fsdp2-cola": {"adapter": "linchain", **FSDP2, **STEP_DOWN},
}
if HAS_DEEPSPEED:
    DISTRIBUTED["zero2-moslora"] = {"adapter": "moslora", "deepspeed": 2}
    DISTRIBUTED["zero3-linchain"] = {"adapter": "linchain", "deepspeed": 3}
    DISTRIBUTED["zero2-cola"] = {"adapter": "moslora", "deepspeed": 2, **STEP_DOWN}
    DISTRIBUTED["zero3-cola"] = {"adapter": "mtlora", "mtlora_structure": "ctcm", "deepspeed": 3, **STEP_DOWN}
# GPU_RUNS=name,name,... trains only those runs (the check's parts each fit a short lease); the others' tests skip
SELECTED = set(os.environ["GPU_RUNS"].split(",")) if os.environ.get("GPU_RUNS") else None
QUANTIZED = {name: ("4bit" if changes.get("load_in_4bit") else "8bit" if changes.get("load_in_8bit") else None)
             for name, changes in {**RUNS, **DISTRIBUTED}.items()}  # fmt: skip
# bf16 logits (max abs of about 10): a few units in the last place of bf16
LOGIT_TOLERANCE = 0.15
requires_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed does not import here")


def gpu_base(workspace, quantized: str | None):
    """The workspace's base on the GPU in bf16, or quantized as axolotl's qlora / 8-bit loads it."""
    return load_base(workspace, quantized, dtype=torch.bfloat16, device="cuda")


@torch.no_grad()
def logits(model, workspace) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    texts = [alpaca_text(record) for record in demo_records(count=4, seed=7)]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to("cuda")
    return model(**batch).logits.float()


@pytest.fixture(scope="module")
def trained(gpu_workspace):
    jobs = {name: ["train", write_config(gpu_workspace, name, **changes)] for name, changes in RUNS.items()}
    for port, (name, changes) in enumerate(DISTRIBUTED.items(), start=29611):
        if "deepspeed" in changes:
            path = gpu_workspace / f"zero{changes['deepspeed']}.json"
            path.write_text(json.dumps({**ZERO, "zero_optimization": {**ZERO["zero_optimization"],
                                                                       "stage": changes["deepspeed"]}}))  # fmt: skip
            changes = {**changes, "deepspeed": str(path)}
        jobs[name] = ["train", write_config(gpu_workspace, name, **changes), "--", "--main_process_port", str(port)]
    return run_all(gpu_workspace, {name: args for name, args in jobs.items() if SELECTED is None or name in SELECTED},
                   at_once=4)  # fmt: skip


def trained_run(trained, name):
    if name not in trained:
        pytest.skip(f"{name} is not in GPU_RUNS")
    result = trained[name]
    require_success(result, f"axolotl train ({name})")
    return result


@pytest.mark.parametrize("name", [*RUNS, *DISTRIBUTED])
def test_runs_train_and_lower_the_loss(trained, name):
    if name.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed does not import here")
    losses = logged_losses(output_of(trained_run(trained, name)))
    assert len(losses) == 20, losses
    measured(f"{name} loss first 5 -> last 5 steps", sum(losses[-5:]) / 5 - sum(losses[:5]) / 5)
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("name", ["qlora-linchain", "qlora-moslora", "qlora-mtlora", "8bit-moslora"])
def test_quantized_runs_trained_on_bitsandbytes_layers_on_the_gpu(gpu_workspace, trained, name):
    trained_run(trained, name)
    quantization = json.loads((gpu_workspace / f"out-{name}" / "config.json").read_text())["quantization_config"]
    assert quantization["load_in_4bit" if QUANTIZED[name] == "4bit" else "load_in_8bit"] is True
    model = PeftModel.from_pretrained(gpu_base(gpu_workspace, QUANTIZED[name]), gpu_workspace / f"out-{name}")
    layers = [module for module in model.modules() if isinstance(module, ChainLoraLayer)]
    wanted = bnb.nn.Linear4bit if QUANTIZED[name] == "4bit" else bnb.nn.Linear8bitLt
    assert layers and all(isinstance(layer.get_base_layer(), wanted) for layer in layers)
    assert all(layer.get_base_layer().weight.is_cuda for layer in layers)


def test_kernels_are_on_for_a_qlora_chain_adapter_and_train_as_the_unfused_layers(gpu_workspace, trained):
    fused_log = output_of(trained_run(trained, "qlora-linchain"))
    assert "axolotl's LoRA kernels (lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel) compute it exactly" in fused_log
    assert "compute it exactly" not in output_of(trained_run(trained, "qlora-linchain-unfused"))
    fused = load_file(gpu_workspace / "out-qlora-linchain" / ADAPTER_WEIGHTS)
    unfused = load_file(gpu_workspace / "out-qlora-linchain-unfused" / ADAPTER_WEIGHTS)
    worst = max(((fused[k].float() - unfused[k].float()).norm() / unfused[k].float().norm()).item() for k in fused)
    measured("qlora-linchain adapter, kernels vs unfused, after 20 bf16 steps (relative)", worst)
    assert worst < 0.05


@pytest.mark.parametrize(
    "name", ["qlora-linchain", "qlora-mtlora", "bf16-moslora", "qlora-cola", "bf16-cola", "zero3-linchain"]
)
def test_reload_and_plain_lora_fold_give_the_adapters_logits(gpu_workspace, trained, name):
    if name.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed does not import here")
    trained_run(trained, name)
    out = gpu_workspace / f"out-{name}"
    chain = PeftModel.from_pretrained(gpu_base(gpu_workspace, QUANTIZED[name]), out)
    first, again = logits(chain, gpu_workspace), logits(chain, gpu_workspace)
    assert torch.equal(first, again)
    fold = PeftModel.from_pretrained(gpu_base(gpu_workspace, QUANTIZED[name]), out / "plain_lora")
    diff = (logits(fold, gpu_workspace) - first).abs().max().item()
    measured(f"{name}: plain-LoRA fold vs chain adapter, logits max abs", diff)
    assert diff < LOGIT_TOLERANCE


MERGED = ["qlora-moslora", "bf16-linchain", *(["zero3-linchain"] if HAS_DEEPSPEED else [])]


@pytest.fixture(scope="module")
def merges(gpu_workspace, trained):
    names = [name for name in MERGED if name in trained]
    for name in names:
        trained_run(trained, name)
    return run_all(gpu_workspace, {name: ["merge-lora", f"{name}.yml"] for name in names}, at_once=len(MERGED))


@pytest.mark.parametrize("name", MERGED)
def test_merge_lora_gives_the_adapters_logits(gpu_workspace, merges, name):
    if name not in merges:
        pytest.skip(f"{name} is not in GPU_RUNS")
    require_success(merges[name], f"axolotl merge-lora ({name})")
    merged_dir = gpu_workspace / f"out-{name}" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16, device_map={"": "cuda"}).eval()
    # merge-lora loads the base unquantized: compare with the adapter on the bf16 base
    chain = PeftModel.from_pretrained(gpu_base(gpu_workspace, None), gpu_workspace / f"out-{name}")
    diff = (logits(merged, gpu_workspace) - logits(chain, gpu_workspace)).abs().max().item()
    measured(f"{name}: merge-lora vs adapter on the bf16 base, logits max abs", diff)
    assert diff < LOGIT_TOLERANCE
    shutil.rmtree(merged_dir)


@pytest.mark.parametrize("name", ["qlora-cola", "bf16-cola", "fsdp2-cola", "zero2-cola", "zero3-cola"])
def test_cola_ties_its_knots(gpu_workspace, trained, name):
    if name.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed does not import here")
    log = output_of(trained_run(trained, name))
    assert log.count("COLA knot after step") == 2
    assert "tied links kept as frozen factors beside the base" in log
    tensors = load_file(gpu_workspace / f"out-{name}" / ADAPTER_WEIGHTS)
    ranks = {**RUNS, **DISTRIBUTED}[name].get("cola_ranks", [8, 8, 8])
    # the two tied links, and the last link saved at its own rank (its zero padding cut away)
    assert {t.shape[0] for key, t in tensors.items() if "lora_tied_A" in key} == {ranks[0] + ranks[1]}
    assert {t.shape[0] for key, t in tensors.items() if ".lora_A." in key} == {ranks[2]}


@requires_deepspeed
def test_zero3_saves_every_core(gpu_workspace, trained):
    trained_run(trained, "zero3-linchain")
    zero3 = load_file(gpu_workspace / "out-zero3-linchain" / ADAPTER_WEIGHTS)
    single = load_file(gpu_workspace / "out-bf16-linchain" / ADAPTER_WEIGHTS)
    assert zero3.keys() == single.keys()
    assert all(zero3[key].shape == single[key].shape and zero3[key].numel() > 0 for key in zero3)


def test_fsdp2_saves_every_core(gpu_workspace, trained):
    trained_run(trained, "fsdp2-linchain")
    fsdp = load_file(gpu_workspace / "out-fsdp2-linchain" / ADAPTER_WEIGHTS)
    single = load_file(gpu_workspace / "out-bf16-linchain" / ADAPTER_WEIGHTS)
    assert fsdp.keys() == single.keys()
    assert all(fsdp[key].shape == single[key].shape for key in fsdp)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn does not import here (it cannot be installed offline)")
def test_flash_attention_trains_a_chain_adapter(trained):
    log = output_of(trained_run(trained, "flash-linchain"))
    assert "flash" in log.lower()
