"""What the tests share: tiny random models built here (nothing downloaded), the papers' formulas written out
independently of the package, chain models and their logits, offline subprocesses and the axolotl runs of tests/e2e.

Fixtures are in the conftest.py files; this module holds plain functions and constants only.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import axolotl.kernels.lora as axolotl_lora
import pytest
import torch
import torch.nn.functional as F
import yaml
from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches, patch_self_attn_lora
from axolotl.utils.dict import DictDefault
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaAttention

from axolotl_chainlora import ChainLoraConfig
from axolotl_chainlora.cola import ColaCallback, ColaSchedule
from axolotl_chainlora.demo import OFFLINE_ENV, run_axolotl
from axolotl_chainlora.layer import ChainLoraLayer

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "axolotl-chainlora"
PLUGIN = "axolotl_chainlora.ChainLoraPlugin"
WEIGHTS = "adapter_model.safetensors"

VOCAB = 96
# the adapter of the in-process tests: rank 4, alpha 8, on two attention projections and one MLP projection
R, ALPHA = 4, 8
SCALE = ALPHA / R
TARGETS = ["q_proj", "v_proj", "down_proj"]
LINCHAIN_DIMS = [R, 2 * R, R]  # a wider middle factor: LinChain's default is three r x r factors
# the kernel tests adapt every projection of a Llama layer, with axolotl's three projection kernels on
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KERNELS = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}
TRAIN_STEPS = 20  # the `axolotl train` runs of tests/e2e


# ---------------------------------------------------------------- tiny models and inputs


def tiny_llama(hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def make_input_ids() -> torch.Tensor:
    """The ids of the `input_ids` fixture, for module-scoped fixtures that cannot use it."""
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- the papers' formulas


def reference_core(chain_type: str, factors: list[torch.Tensor]) -> torch.Tensor:
    """T by the papers' definitions (LinChain, MoSLoRA, MTLoRA), in float64; independent of cores.py.

    `factors` are the core's tensors in the order weight, weight_1, ...
    """
    factors = [f.detach().double() for f in factors]
    if chain_type in ("moslora", "mtlora_shim"):
        (C,) = factors
        return C
    if chain_type == "linchain":
        T = factors[0]
        for factor in factors[1:]:
            T = T @ factor
        return T
    if chain_type == "mtlora_icfm":
        (C,) = factors
        return C @ C.T
    if chain_type == "mtlora_ctcm":
        C, D = factors
        return C @ D
    if chain_type == "mtlora_dtsm":
        C, D = factors
        return C + D
    raise AssertionError(chain_type)


def core_factors(layer, adapter: str = "default") -> list[torch.Tensor]:
    """One layer's core parameters, ordered weight, weight_1, weight_2, ..."""
    core = layer.lora_core[adapter]
    names = [name for name, _ in core.named_parameters()]
    ordered = ["weight"] + [f"weight_{i}" for i in range(1, len(names))]
    assert sorted(names) == sorted(ordered), names
    return [getattr(core, name) for name in ordered]


def saved_core_factors(tensors: dict[str, torch.Tensor], module_key: str) -> list[torch.Tensor]:
    """One module's core tensors from a saved adapter file, in float64, ordered weight, weight_1, weight_2, ..."""
    prefix = f"{module_key}.lora_core."
    names = [key[len(prefix) :] for key in tensors if key.startswith(prefix)]
    expected = ["weight"] + [f"weight_{i}" for i in range(1, len(names))]
    assert sorted(names) == sorted(expected), names
    return [tensors[prefix + name].double() for name in expected]


# ---------------------------------------------------------------- chain models


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor (B included) non-zero values, so outputs really depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def chain_config(chain_type: str, **overrides) -> ChainLoraConfig:
    """R, ALPHA on TARGETS; a LinChain has LINCHAIN_DIMS unless `overrides` sets chain_dims (None: the default)."""
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, chain_type=chain_type)
    if chain_type == "linchain":
        kwargs["chain_dims"] = LINCHAIN_DIMS
    return ChainLoraConfig(**{**kwargs, **overrides})


def chain_model(chain_type: str, base: torch.nn.Module | None = None, seed: int | None = 3, **overrides) -> PeftModel:
    """A chain adapter of chain_config(chain_type, **overrides) on `base` (a fresh tiny Llama by default), in eval mode.

    With a seed, randomize_adapters gives every adapter tensor random values; with seed=None the adapter is as PEFT
    initialises it (B = 0).
    """
    model = get_peft_model(base if base is not None else tiny_llama(), chain_config(chain_type, **overrides))
    if seed is not None:
        randomize_adapters(model, seed=seed)
    return model.eval()


def knot(model, merge: str, optimizer=None, step: int = 1, ranks=None) -> ColaCallback:
    """Tie one knot the way the trainer does, on a callback set up for `merge`."""
    callback = ColaCallback(ColaSchedule(links=3, merge=merge, ranks=ranks))
    callback.into_base = callback._ties_into_base(callback._layers(model))
    callback.tie_knot(model, optimizer, step=step, seed=0)
    return callback


def chain_layers(model: torch.nn.Module) -> dict[str, ChainLoraLayer]:
    """The model's chain layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ChainLoraLayer)}


@torch.no_grad()
def logits_of(model, inputs: torch.Tensor | dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The model's logits, as `dtype`, for a batch of token ids or a tokenizer's output (ids and attention mask)."""
    inputs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    return model(**inputs).logits.to(dtype)


# ---------------------------------------------------------------- axolotl's LoRA kernels in process


@contextlib.contextmanager
def llama_attention_patched_by_axolotl(base_model_dir: str):
    """axolotl's rewrite of LlamaAttention.forward for its qkv/o kernels (patch_self_attn_lora, process-wide),
    taken back when the block ends; axolotl's get_lora_parameters is put back too."""
    original_forward = LlamaAttention.forward
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(axolotl_lora, "get_lora_parameters", axolotl_lora.get_lora_parameters)
            patch_self_attn_lora(DictDefault(base_model=base_model_dir, model_config_type="llama", **KERNELS))
            yield patch
    finally:
        LlamaAttention.forward = original_forward
        if "_original_forward" in LlamaAttention.__dict__:  # axolotl's mark that the class is patched
            del LlamaAttention._original_forward


def measured(what: str, value: float) -> None:
    """A figure the GPU suite measured, on a line scripts/gpu_check.sh collects into its summary."""
    print(f"MEASURED {what}: {value:.3e}")


def with_kernels(model, kernels: bool):
    """axolotl's patcher on the model: the fused kernels, or (kernels=False) the unfused fallbacks it installs."""
    return apply_lora_kernel_patches(model, DictDefault(model_config_type="llama", **(KERNELS if kernels else {})))


def loss_and_gradients(model, input_ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor | None]]:
    """Next-token loss in float64 (from the model's logits) and the gradients of the trainable tensors."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits.double()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def relative_errors(gradients: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the relative Frobenius error of `gradients` against `reference`, in float64."""
    return {
        name: (grad.double() - reference[name].double()).norm().item() / reference[name].double().norm().item()
        for name, grad in gradients.items()
    }


# ---------------------------------------------------------------- subprocesses


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess, offline (no downloads, no telemetry), plus `extra`."""
    return {**os.environ, **OFFLINE_ENV, "TRANSFORMERS_OFFLINE": "1", **extra}


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed `axolotl-chainlora` command, offline, its output captured."""
    return subprocess.run(
        [str(CLI), *args], cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=timeout
    )


def torchrun(worker: str, *args: str) -> None:
    """Run a worker of tests/e2e/workers on two CPU processes (DeepSpeed's included: DS_ACCELERATOR=cpu)."""
    # the workers import this module: torchrun runs them as scripts, without pytest's pythonpath
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = offline_env(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, DS_ACCELERATOR="cpu")
    worker_path = REPO / "tests" / "e2e" / "workers" / worker
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker_path), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def logged_losses(log: str) -> list[float]:
    """The per-step training losses of the HF Trainer log ({'loss': '6.082', ...})."""
    return [float(value) for value in re.findall(r"\{'loss': '([0-9.]+)'", log)]


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def require_success(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output_of(result)[-4000:]}"


# ---------------------------------------------------------------- axolotl runs in a demo workspace


def write_config(workspace: Path, name: str, run_defaults: bool = True, **changes) -> str:
    """Write <name>.yml into the workspace: the demo config with `changes` (a value of None removes the key).

    With run_defaults, the run first gets its own output_dir (./out-<name>) and dataset_prepared_path (runs go two at
    a time, each prepares its dataset in its own folder), TRAIN_STEPS steps and a loss logged at every step.
    Returns the file name, relative to the workspace as the axolotl commands are run from there.
    """
    cfg = yaml.safe_load((workspace / "config.yml").read_text())
    assert cfg["plugins"] == [PLUGIN]
    if run_defaults:
        cfg.update(
            output_dir=f"./out-{name}",
            dataset_prepared_path=f"./prepared-{name}",
            max_steps=TRAIN_STEPS,
            logging_steps=1,
        )
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = workspace / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path.name


def run_all(workspace: Path, jobs: dict[str, list[str]], at_once: int = 2) -> dict[str, subprocess.CompletedProcess]:
    """Run axolotl commands `at_once` at a time (2: the CI's two CPU cores); job name -> CLI args, log at
    <name>.log."""
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {name: pool.submit(run_axolotl, args, workspace, f"{name}.log") for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def load_base(workspace: Path, quantized: bool | str = False, dtype=torch.float32, device: str = "cpu"):
    """The workspace's base model in `dtype`, or quantized as a run trains on it: 4-bit (True or "4bit": NF4 with
    double quant, computing in `dtype`) or "8bit" (LLM.int8)."""
    kwargs = {"device_map": {"": device}} if device != "cpu" else {}
    if quantized in (True, "4bit"):
        # written here, not taken from the plugin
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    elif quantized == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(workspace / "base", dtype=dtype, **kwargs).eval()
