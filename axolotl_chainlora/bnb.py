"""bitsandbytes 4-bit and 8-bit base layers (QLoRA; Dettmers et al., arXiv:2305.14314).

PEFT's own bnb LoRA layers resolve only DoRA and aLoRA and would silently train
plain LoRA with our config, so the chain layers subclass them here.
"""

from __future__ import annotations

from peft.tuners.lora import bnb as peft_bnb

from .layer import ChainLoraLayer


class Linear4bit(ChainLoraLayer, peft_bnb.Linear4bit):
    """bitsandbytes Linear4bit (NF4 or FP4)."""


class Linear8bitLt(ChainLoraLayer, peft_bnb.Linear8bitLt):
    """bitsandbytes Linear8bitLt (LLM.int8())."""
