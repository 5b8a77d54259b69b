"""Make PEFT know the chain adapters: load them by their saved peft_type, refuse what would drop a core."""

from __future__ import annotations

import functools

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.lora import LoraModel

from .config import CHAIN_PEFT_TYPE, ChainLoraConfig


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


def register_with_peft() -> None:
    # in memory a chain config is a LORA config (LoraModel, LoRA save/load); on disk it says LORA_CHAIN,
    # and PeftConfig.from_pretrained looks that up here
    PEFT_TYPE_TO_CONFIG_MAPPING[CHAIN_PEFT_TYPE] = ChainLoraConfig
    if not getattr(LoraModel.add_weighted_adapter, "refuses_chain_adapters", False):
        LoraModel.add_weighted_adapter = _refuse_chain_adapters(LoraModel.add_weighted_adapter)
