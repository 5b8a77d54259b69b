"""axolotl-chainlora: LinChain, MoSLoRA and MTLoRA as exact PEFT LoRA variants, and Chain of LoRA.

Importing this package registers the chain adapters with PEFT, so that
`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and transformers'
`load_adapter` rebuild them from an adapter directory.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from .log import third_party_notices_hidden

with third_party_notices_hidden():
    import peft

__version__ = "0.1.0"

# LoraVariant and LoraConfig._register_custom_module are private/experimental PEFT API
TESTED_PEFT_VERSIONS = SpecifierSet(">=0.20.0,<0.22")


def check_peft_version(installed: str) -> None:
    if installed not in TESTED_PEFT_VERSIONS:
        raise ImportError(
            f"axolotl-chainlora {__version__} is tested with peft{TESTED_PEFT_VERSIONS} but peft {installed} "
            "is installed. Chain adapters hook into private PEFT API that changes between releases, so another "
            f"version could silently train plain LoRA: pip install 'peft{TESTED_PEFT_VERSIONS}'."
        )


check_peft_version(peft.__version__)

with third_party_notices_hidden():
    from .cola import ColaCallback, ColaSchedule
    from .config import CHAIN_PEFT_TYPE, ChainLoraConfig
    from .cores import CHAIN_INITS, CHAIN_TYPES, core_parameter_count
    from .export import fold_to_lora, merge_to_full_model
    from .registration import register_with_peft

register_with_peft()


def __getattr__(name: str):
    # the axolotl plugin imports axolotl: load it only when axolotl asks for it
    if name == "ChainLoraPlugin":
        from .plugin import ChainLoraPlugin

        return ChainLoraPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHAIN_INITS",
    "CHAIN_PEFT_TYPE",
    "CHAIN_TYPES",
    "ChainLoraConfig",
    "ChainLoraPlugin",
    "ColaCallback",
    "ColaSchedule",
    "check_peft_version",
    "core_parameter_count",
    "fold_to_lora",
    "merge_to_full_model",
]
