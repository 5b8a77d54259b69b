"""Make PEFT know the chain adapters: load them by their saved peft_type, save COLA's zero-padded links at their
own rank, refuse what would drop a core."""

from __future__ import annotations

import functools

import peft.peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.lora import LoraModel

from .config import CHAIN_PEFT_TYPE, ChainLoraConfig
from .layer import ChainLoraLayer


def _refuse_chain_adapters(add_weighted_adapter):
    @functools.wraps(add_weighted_adapter)
    def guarded(self, adapters, *args, **kwargs):
        chain_adapters = [name for name in adapters if isinstance(self.peft_config.get(name), ChainLoraConfig)]
        if chain_adapters:
            raise ValueError(
                f"add_weighted_adapter cannot combine chain adapters {chain_adapters}: it mixes lora_A and "
                "lora_B only and would drop the cores. Fold each one into a plain LoRA first "
                "(axolotl_chainlora.fold_to_lora) and combine the folded adapters."
            )
        return add_weighted_adapter(self, adapters, *args, **kwargs)

    guarded.refuses_chain_adapters = True
    return guarded


def trim_padded_links(model, tensors: dict, adapter_name: str = "default") -> dict:
    """An adapter's saved tensors (PEFT's names, without the adapter name) with each COLA link that a rank
    step-down zero-padded cut to its own rank, as a true rank-r link writes them."""
    for name, module in model.named_modules():
        chain = isinstance(module, ChainLoraLayer) and adapter_name in getattr(module, "lora_core", {})
        if not chain or module.link_positions(adapter_name) is None:
            continue
        for key in tensors:
            if key.startswith(f"{name}."):
                layer_name = key[len(name) + 1 :].split(".")[0]
                tensors[key] = module.trim_link_tensor(adapter_name, layer_name, tensors[key])
    return tensors


def _trim_when_saving(get_peft_model_state_dict):
    @functools.wraps(get_peft_model_state_dict)
    def trimmed(model, state_dict=None, adapter_name: str = "default", *args, **kwargs):
        return trim_padded_links(model, get_peft_model_state_dict(model, state_dict, adapter_name, *args, **kwargs),
                                 adapter_name)  # fmt: skip

    trimmed.trims_padded_links = True
    return trimmed


def register_with_peft() -> None:
    # in memory a chain config is a LORA config (LoraModel, LoRA save/load); on disk it says LORA_CHAIN,
    # and PeftConfig.from_pretrained looks that up here
    PEFT_TYPE_TO_CONFIG_MAPPING[CHAIN_PEFT_TYPE] = ChainLoraConfig
    if not getattr(LoraModel.add_weighted_adapter, "refuses_chain_adapters", False):
        LoraModel.add_weighted_adapter = _refuse_chain_adapters(LoraModel.add_weighted_adapter)
    # PeftModel.save_pretrained reads the name from its module; PEFT has no hook for a tuner's saved tensors
    if not getattr(peft.peft_model.get_peft_model_state_dict, "trims_padded_links", False):
        peft.peft_model.get_peft_model_state_dict = _trim_when_saving(peft.peft_model.get_peft_model_state_dict)
