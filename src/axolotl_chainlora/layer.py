"""PEFT LoRA layers with a core: y = W0 x + s * B T A dropout(x).

The core is a LoRA variant in PEFT's sense (`ChainVariant`): PEFT's own Linear,
Linear4bit and Linear8bitLt then run forward, merge, unmerge, disable and mixed
batches through it. `ChainLoraLayer` adds what the variant API does not cover:
the delta weight (merge, PEFT's SVD conversion), fused q/k/v splits and a strict check
of loaded tensors.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ChainLoraConfig
from .cores import ChainCore


class FusedLoraB(nn.Module):
    """B of a fused projection (q, k, v in one matrix): blockdiag(B_1, ..., B_k).

    `weight` stacks the k blocks (out x r), the same shape as LoRA's B; block g maps
    slice g of the k*r hidden units to output slice g.
    """

    def __init__(self, r: int, split_sizes: list[int]):
        super().__init__()
        self.r = r
        self.split_sizes = split_sizes
        self.weight = nn.Parameter(torch.empty(sum(split_sizes), r))

    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self.weight.split(self.split_sizes, dim=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slices = hidden.split(self.r, dim=-1)
        return torch.cat([F.linear(h, block) for h, block in zip(slices, self.blocks())], dim=-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, split_sizes={self.split_sizes}"


class ChainVariant(LoraVariant):
    """The core as a PEFT LoRA variant; all math lives on the layer."""

    @staticmethod
    def init(module: ChainLoraLayer, adapter_name: str, config: ChainLoraConfig, **kwargs) -> None:
        module.add_chain_core(adapter_name, config, kwargs.get("target_name") or module.module_key)

    @staticmethod
    def merge_safe(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: ChainLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        hidden = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        update = module.lora_B[active_adapter](module.lora_core[active_adapter](hidden))
        return result + update * module.scaling[active_adapter]


class ChainLoraLayer:
    """Mixin put before a PEFT LoRA layer class in the MRO."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_core",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs):
        # PEFT's bnb layers call update_layer without the module's name; fused splits match on it
        self.module_key = kwargs.get("target_name", "")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._register_load_state_dict_pre_hook(_refuse_incomplete_adapter_tensors, with_module=True)

    def resolve_lora_variant(self, *, config, **kwargs):
        if isinstance(config, ChainLoraConfig):
            return ChainVariant()
        # a plain LoraConfig adapter added to this layer stays plain LoRA
        return super().resolve_lora_variant(config=config, **kwargs)

    def add_chain_core(self, adapter_name: str, config: ChainLoraConfig, module_key: str) -> None:
        if "lora_core" not in self._modules:
            self.lora_core = nn.ModuleDict()
        r = self.r[adapter_name]
        split_sizes = config.fused_split_sizes(module_key, self.out_features)
        if split_sizes:
            self._make_fused(adapter_name, config, split_sizes)
        core_r = r * len(split_sizes) if split_sizes else r
        # ChainLoraConfig allows chain_dims for linchain only
        self.lora_core[adapter_name] = ChainCore(config.chain_type, core_r, config.chain_dims, config.chain_init)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _make_fused(self, adapter_name: str, config: ChainLoraConfig, split_sizes: list[int]) -> None:
        """Give each of the k output slices its own rank-r B, sharing one k*r-dim A."""
        r = self.r[adapter_name]
        lora_A = nn.Linear(self.in_features, r * len(split_sizes), bias=False)
        lora_B = FusedLoraB(r, split_sizes)
        # the same draws PEFT's reset_lora_parameters makes for A and B
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(lora_B.weight)
        else:
            nn.init.kaiming_uniform_(lora_B.weight, a=math.sqrt(5))
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B T A in the base weight's layout, computed in float32.

        Reads the factors directly, as PEFT's own LoRA layers do: under ZeRO-3 the
        caller gathers them first.
        """
        if adapter not in self.lora_core:
            return super().get_delta_weight(adapter)
        lora_B = self.lora_B[adapter]
        core_times_A = self.lora_core[adapter].matrix().float() @ self.lora_A[adapter].weight.float()
        B = torch.block_diag(*lora_B.blocks()) if isinstance(lora_B, FusedLoraB) else lora_B.weight
        delta = (B.float() @ core_times_A) * self.scaling[adapter]
        return transpose(delta, self.fan_in_fan_out).to(lora_B.weight.dtype)


def _refuse_incomplete_adapter_tensors(module, state_dict, prefix, *args) -> None:
    """Refuse an adapter file whose tensors do not match this layer's adapters (a core missing, a link too many).

    PEFT only warns about such files and keeps the freshly drawn tensors: a silently wrong adapter.
    Names look like 'lora_A.default.weight': adapter-layer name, adapter name, tensor.
    """
    layer_names = module.adapter_layer_names
    own: dict[str, set[str]] = {}
    for layer_name in layer_names:
        for key in getattr(module, layer_name, nn.ModuleDict()).state_dict():
            own.setdefault(key.split(".")[0], set()).add(f"{layer_name}.{key}")
    loaded: dict[str, set[str]] = {}
    unexpected = []
    for key in state_dict:
        name = key[len(prefix) :]
        parts = name.split(".")
        if not key.startswith(prefix) or parts[0] not in layer_names:
            continue
        if len(parts) > 1 and parts[1] in own:
            loaded.setdefault(parts[1], set()).add(name)
        else:
            unexpected.append(name)
    missing = []
    for adapter, names in loaded.items():
        missing += sorted(own[adapter] - names)
        unexpected += sorted(names - own[adapter])
    if missing or unexpected:
        raise ValueError(
            f"The adapter tensors loaded into module '{prefix.rstrip('.')}' do not match its config: "
            f"missing {missing}, unexpected {unexpected}. The adapter file and its adapter_config.json "
            "(chain_type, chain_dims, chain_fused_splits) disagree; it may be damaged or written by another "
            "version of axolotl-chainlora."
        )


class Linear(ChainLoraLayer, LoraLinear):
    """torch.nn.Linear, or transformers' Conv1D (fan_in_fan_out=True)."""


def _base_layer(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _dispatch_linear(target: nn.Module, adapter_name: str, config: ChainLoraConfig, **kwargs) -> Linear:
    base_layer = _base_layer(target)
    is_conv1d = isinstance(base_layer, Conv1D)
    if bool(config.fan_in_fan_out) != is_conv1d:
        raise ValueError(
            f"fan_in_fan_out={config.fan_in_fan_out} does not fit module '{kwargs.get('target_name')}' of type "
            f"{type(base_layer).__name__}: set fan_in_fan_out={is_conv1d} "
            "(True for transformers' Conv1D as in GPT-2, False for torch.nn.Linear)."
        )
    return Linear(target, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)


def _refuse_unsupported_target(target: nn.Module, adapter_name: str, config: ChainLoraConfig, **kwargs):
    layer_type = type(_base_layer(target))
    raise TypeError(
        f"chain_type={config.chain_type!r} cannot adapt module '{kwargs.get('target_name')}' of type "
        f"{layer_type.__module__}.{layer_type.__qualname__}. Chain adapters support torch.nn.Linear, "
        "transformers' Conv1D and bitsandbytes Linear4bit/Linear8bitLt: remove this module from "
        "target_modules or add it to exclude_modules."
    )


@functools.cache
def chain_layer_mapping() -> dict[type, object]:
    """Target type -> layer factory for LoraConfig._register_custom_module. PEFT takes the first
    isinstance match, so bnb layers (which subclass nn.Linear) come first and the refusal last."""
    from .bnb import BNB_LAYER_MAPPING  # bnb.py builds on this module

    return {
        **BNB_LAYER_MAPPING,
        Conv1D: _dispatch_linear,
        nn.Linear: _dispatch_linear,
        nn.Module: _refuse_unsupported_target,
    }
