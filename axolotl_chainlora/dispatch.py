"""Which chain layer wraps which base layer, as PEFT's `dispatch_*` functions do for LoRA.

`chain_layer_mapping` is what `ChainLoraConfig` hands to `LoraConfig._register_custom_module`:
PEFT then builds a chain layer instead of its own LoRA layer for every target.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import bitsandbytes as bnb
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bnb import Linear4bit, Linear8bitLt
from .layer import Linear

if TYPE_CHECKING:
    from .config import ChainLoraConfig


def base_layer_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def dispatch_default(target: nn.Module, adapter_name: str, config: ChainLoraConfig, **kwargs) -> Linear:
    """torch.nn.Linear, or transformers' Conv1D when fan_in_fan_out fits it."""
    base_layer = base_layer_of(target)
    is_conv1d = isinstance(base_layer, Conv1D)
    if bool(config.fan_in_fan_out) != is_conv1d:
        raise ValueError(
            f"fan_in_fan_out={config.fan_in_fan_out} does not fit module '{kwargs.get('target_name')}' of type "
            f"{type(base_layer).__name__}: set fan_in_fan_out={is_conv1d} "
            "(True for transformers' Conv1D as in GPT-2, False for torch.nn.Linear)."
        )
    return Linear(target, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)


def refuse_unsupported_target(target: nn.Module, adapter_name: str, config: ChainLoraConfig, **kwargs):
    layer_type = type(base_layer_of(target))
    raise TypeError(
        f"chain_type={config.chain_type!r} cannot adapt module '{kwargs.get('target_name')}' of type "
        f"{layer_type.__module__}.{layer_type.__qualname__}. Chain adapters support torch.nn.Linear, "
        "transformers' Conv1D and bitsandbytes Linear4bit/Linear8bitLt: remove this module from "
        "target_modules or add it to exclude_modules."
    )


@functools.cache
def chain_layer_mapping() -> dict[type, object]:
    """Target type -> layer factory. PEFT takes the first isinstance match, so the bitsandbytes layers
    (which subclass nn.Linear) come first and the refusal of every other type last."""
    return {
        bnb.nn.Linear4bit: Linear4bit,
        bnb.nn.Linear8bitLt: Linear8bitLt,
        Conv1D: dispatch_default,
        nn.Linear: dispatch_default,
        nn.Module: refuse_unsupported_target,
    }
