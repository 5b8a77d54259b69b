"""What the benchmarks share: the methods under comparison, random Llama-shaped models, presets with overrides,
the training loop of the learning benchmarks, the process pool over their grid, and the record of a run."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    TrainerControl,
    TrainerState,
    get_cosine_schedule_with_warmup,
)

import axolotl_chainlora  # noqa: E402
from axolotl_chainlora import ChainLoraConfig  # noqa: E402
from axolotl_chainlora.cola import ColaCallback, ColaSchedule  # noqa: E402
from axolotl_chainlora.layer import ChainLoraLayer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Method:
    """One adapter set-up. `chain_type` None is PEFT's own LoRA; `cola_links` > 1 runs COLA on it; `kernels`
    trains it through axolotl's fused LoRA kernels."""

    name: str
    chain_type: str | None
    rank: int
    chain_dims: tuple[int, ...] | None = None
    chain_init: str = "kaiming"
    cola_links: int = 1
    kernels: bool = False

    def peft_config(self, target_modules: list[str]) -> LoraConfig:
        # alpha = 2 r throughout: every method starts from the same scale s = 2
        # a causal LM, as axolotl builds it (and its kernel patcher requires)
        common = dict(
            r=self.rank,
            lora_alpha=2 * self.rank,
            lora_dropout=0.0,
            target_modules=target_modules,
            task_type="CAUSAL_LM",
        )
        if self.chain_type is None:
            return LoraConfig(**common)
        dims = list(self.chain_dims) if self.chain_dims else None
        return ChainLoraConfig(**common, chain_type=self.chain_type, chain_dims=dims, chain_init=self.chain_init)


def chain_methods(r: int) -> list[Method]:
    """The adapters with a core, at the papers' settings for rank r."""
    return [
        Method(f"linchain-3-{r}", "linchain", r, (r,) * 4),
        Method(f"linchain-2-{r // 2}", "linchain", r // 2, (r // 2, r, r // 2)),
        Method("moslora", "moslora", r),
        *(Method(f"mtlora-{s}", f"mtlora_{s}", r) for s in ("shim", "icfm", "ctcm", "dtsm")),
    ]


def llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of `shape` (LlamaConfig fields) with random weights, frozen, built on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096)).to(dtype)
    return model.requires_grad_(False)


class Cola:
    """Drives a ColaCallback from a hand-written training loop through the hooks transformers' Trainer calls."""

    def __init__(self, links: int, max_steps: int, seed: int, knots: tuple[int, ...] | None = None):
        self.callback = ColaCallback(ColaSchedule(links=links, knots=knots))
        self.state = TrainerState(max_steps=max_steps)
        self.control = TrainerControl()
        self.args = types.SimpleNamespace(seed=seed)

    def begin(self, model) -> None:
        self.callback.on_train_begin(self.args, self.state, self.control, model=model)

    def step_done(self, model, optimizer) -> bool:
        """Count one optimizer step; True when it was a knot."""
        self.state.global_step += 1
        self.callback.on_step_end(self.args, self.state, self.control, model=model, optimizer=optimizer)
        return self.state.global_step in self.callback.knot_steps


# the control PEFT's maintainers asked for: plain LoRA whose A starts as a LinChain's folded T A, B = 0
FOLDED_CHAIN_INIT = "lora, linchain init folded into A"


def with_overrides(preset: dict, overrides: list[str]) -> dict:
    """The preset with KEY=VALUE settings replaced: a key of the preset or of its model `shape`. VALUE takes the
    setting's type; a list setting takes comma-separated values (`lrs=1e-4,3e-4`)."""
    preset = {**preset, "shape": dict(preset["shape"])}
    for override in overrides:
        key, _, value = override.partition("=")
        settings = preset["shape"] if key in preset["shape"] else preset
        if key not in settings or key == "shape":
            known = sorted([*preset["shape"], *(k for k in preset if k != "shape")])
            raise SystemExit(f"--override {override}: {key!r} is not a setting of this preset; one of {known}")
        current = settings[key]
        if isinstance(current, (list, tuple)):
            settings[key] = type(current)(type(current[0])(v) for v in value.split(","))
        else:
            settings[key] = type(current)(value)
    return preset


def with_adapter(base: nn.Module, method: Method, target_modules: list[str]) -> nn.Module:
    """A copy of `base` with the method's adapter, in training mode; the caller seeds the adapter's draw."""
    model = get_peft_model(copy.deepcopy(base), method.peft_config(target_modules))
    if method.name == FOLDED_CHAIN_INIT:
        set_A_to_folded_chain(model, base, method.rank, target_modules)
    return model.train()


@torch.no_grad()
def set_A_to_folded_chain(lora_model: nn.Module, base: nn.Module, rank: int, target_modules: list[str]) -> None:
    """Draw a LinChain-3 adapter and set the plain LoRA's A to its T A (B stays 0): the same start, no core."""
    chain = get_peft_model(copy.deepcopy(base), Method("", "linchain", rank).peft_config(target_modules))
    lora_layers = dict(lora_model.named_modules())
    for name, layer in chain.named_modules():
        if isinstance(layer, ChainLoraLayer):
            folded = layer.lora_core["default"].times(layer.lora_A["default"].weight)
            lora_layers[name].lora_A["default"].weight.copy_(folded)


def train_adapter(
    model: nn.Module,
    method: Method,
    lr: float,
    steps: int,
    seed: int,
    loss_at_step: Callable[[], torch.Tensor],
    evaluate: Callable[[], dict] | None = None,
    eval_steps: Iterable[int] = (),
) -> tuple[list[float], dict[int, dict]]:
    """The learning benchmarks' loop: AdamW (no weight decay) with one cosine schedule and 5% warmup for the whole
    run, as COLA keeps it across knots; COLA's knots when `method.cola_links` > 1. Returns the training loss of every
    step and `evaluate()` after each of `eval_steps` (1-based)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    cola = Cola(method.cola_links, max_steps=steps, seed=seed) if method.cola_links > 1 else None
    if cola:
        cola.begin(model)
    eval_steps, curve, evaluations = set(eval_steps), [], {}
    for step in range(1, steps + 1):
        loss = loss_at_step()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cola:
            cola.step_done(model, optimizer)
        curve.append(loss.item())
        if step in eval_steps and evaluate:
            evaluations[step] = evaluate()
    return curve, evaluations


def run_grid(grid: list[tuple], work: Callable, jobs: int, start_worker: Callable, start_args: tuple) -> list:
    """`work(*cell)` for every cell of the grid, after `start_worker(*start_args)`: in this process when `jobs` is 1,
    else in `jobs` spawned processes of one thread each (the small matmuls gain nothing from threads)."""
    if jobs == 1:
        start_worker(*start_args)
        return [work(*cell) for cell in grid]
    initializer = functools.partial(_start_one_thread_worker, start_worker)
    with ProcessPoolExecutor(jobs, get_context("spawn"), initializer, start_args) as pool:
        return list(pool.map(work, *zip(*grid)))


def _start_one_thread_worker(start_worker: Callable, *start_args) -> None:
    torch.set_num_threads(1)
    start_worker(*start_args)


def best_lr(by_lr: dict[float, list[dict]], metric: str) -> float:
    """The LR whose runs have the lowest mean `metric`."""
    return min(by_lr, key=lambda lr: statistics.mean(run[metric] for run in by_lr[lr]))


def at_grid_edge(lr: float, lrs: list[float]) -> bool:
    return len(lrs) > 1 and lr in (min(lrs), max(lrs))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_result(out_dir: Path, name: str, record: dict) -> Path:
    """OUT_DIR/NAME.json, with the software that produced it."""
    record = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "axolotl_chainlora": axolotl_chainlora.__version__,
        },
        **record,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
