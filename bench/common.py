"""What both benchmarks share: the methods under comparison, random Llama-shaped models, the record of a run."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import json  # noqa: E402
import platform  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState  # noqa: E402

import axolotl_chainlora  # noqa: E402
from axolotl_chainlora import ChainLoraConfig  # noqa: E402
from axolotl_chainlora.cola import ColaCallback, ColaSchedule  # noqa: E402

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
