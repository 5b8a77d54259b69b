"""ChainLoraConfig: a peft.LoraConfig that puts a learnable core T between A and B."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

from .cores import CHAIN_INITS, CHAIN_TYPES

# adapter_config.json says this instead of "LORA": plain PEFT then fails to load our adapters
# instead of silently dropping the cores (measured: outputs off by up to 0.97)
CHAIN_PEFT_TYPE = "LORA_CHAIN"
# bumped whenever the saved layout changes; adapters of any other format are refused
CHAIN_FORMAT_VERSION = 1
# PEFT inits that build A and B for T = I (PiSSA, OLoRA, LoftQ, ...) would be wrong with a core
SUPPORTED_LORA_INITS = (True, False, "gaussian")


@dataclass
class ChainLoraConfig(LoraConfig):
    """LoRA with a core: delta_W = s * B @ T @ A, T built by `chain_type` (see cores.py).

    Takes every LoraConfig argument plus the fields below. Works with `peft.get_peft_model`.
    """

    chain_type: Optional[str] = field(
        default=None,
        # PEFT's variant resolution sees this field, so a stock LoRA layer handed this
        # config fails ("unsupported variant") instead of training plain LoRA
        metadata={"help": f"The core between A and B, one of {CHAIN_TYPES}.", "is_lora_variant": True},
    )
    chain_dims: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "linchain only: dims d0..dn of the links W_i (d_{i-1} x d_i), with d0 = dn = r. "
            "Default [r, r, r, r] (LinChain-3-r); [8, 16, 8] with r=8 is LinChain-2-8."
        },
    )
    chain_init: str = field(
        default="kaiming",
        metadata={"help": f"Initialisation of the core, one of {CHAIN_INITS}. 'kaiming' is the papers' default."},
    )
    chain_fused_splits: Optional[dict[str, Union[int, list[int]]]] = field(
        default=None,
        metadata={
            "help": "mtlora_* only: fused projections (module name or regex, as in rank_pattern) to their output "
            "split, a number of equal slices or a list of slice sizes; e.g. {'c_attn': 3} for GPT-2, "
            "{'qkv_proj': [5120, 1280, 1280]} for a GQA model. Each slice keeps its own rank-r B and one "
            "(k r) x (k r) core mixes the k subspaces, as the MTLoRA paper does for GPT-2's qkv."
        },
    )
    cola_tied_ranks: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Chain of LoRA (COLA): the ranks of the links already tied into this adapter, oldest first. "
            "Their folded factors are saved beside the current link (lora_tied_A, lora_tied_B) and add to its "
            "update. Set by COLA training, not by hand."
        },
    )
    chain_format_version: int = field(
        default=CHAIN_FORMAT_VERSION,
        metadata={"help": "Saved-layout version of axolotl-chainlora; set automatically."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_chain_fields()
        self._refuse_features_that_assume_no_core()
        from .layer import chain_layer_mapping  # the layers import this module

        self._register_custom_module(chain_layer_mapping())

    def _validate_chain_fields(self) -> None:
        if self.chain_format_version != CHAIN_FORMAT_VERSION:
            raise ValueError(
                f"chain_format_version={self.chain_format_version}: this adapter was saved by an "
                f"axolotl-chainlora whose format differs from this install's ({CHAIN_FORMAT_VERSION}). "
                "Install the axolotl-chainlora release that wrote it, or re-export it from there."
            )
        if self.chain_type not in CHAIN_TYPES:
            raise ValueError(f"chain_type={self.chain_type!r} is not supported: use one of {', '.join(CHAIN_TYPES)}.")
        if self.chain_init not in CHAIN_INITS:
            raise ValueError(f"chain_init={self.chain_init!r} is not supported: use one of {', '.join(CHAIN_INITS)}.")
        if self.chain_dims is not None:
            self._validate_chain_dims()
        if self.chain_fused_splits:
            self._validate_fused_splits()
        if self.cola_tied_ranks is not None and not (
            isinstance(self.cola_tied_ranks, (list, tuple)) and all(_is_positive_int(r) for r in self.cola_tied_ranks)
        ):
            raise ValueError(f"cola_tied_ranks={self.cola_tied_ranks!r} must be a list of positive integers.")

    def _validate_chain_dims(self) -> None:
        if self.chain_type != "linchain":
            raise ValueError(
                f"chain_dims is for chain_type='linchain' only, not {self.chain_type!r}: remove chain_dims."
            )
        check_chain_dims(self.chain_dims, self.r, key="chain_dims", r_key="r")
        if self.rank_pattern:
            raise ValueError(
                "chain_dims fixes the rank of every layer, so it cannot be combined with rank_pattern: "
                "remove chain_dims (each layer then gets [r, r, r, r] for its own r) or rank_pattern."
            )
        self.chain_dims = list(self.chain_dims)

    def _validate_fused_splits(self) -> None:
        if not self.chain_type.startswith("mtlora_"):
            raise ValueError(
                f"chain_fused_splits is for the mtlora_* chain types only, not {self.chain_type!r}: "
                "remove chain_fused_splits."
            )
        check_fused_splits(self.chain_fused_splits, key="chain_fused_splits")
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported with chain_fused_splits: set lora_bias=False.")

    def _refuse_features_that_assume_no_core(self) -> None:
        if self.init_lora_weights not in SUPPORTED_LORA_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} builds A and B for a LoRA without a core "
                f"(T = I) and would be wrong here: use one of {SUPPORTED_LORA_INITS}."
            )
        if self.target_parameters:
            raise ValueError(
                "target_parameters (LoRA on raw nn.Parameters) is not supported by chain adapters: "
                "target the modules with target_modules instead."
            )
        for f in dataclasses.fields(LoraConfig):
            if f.metadata.get("is_lora_variant") and getattr(self, f.name):
                raise ValueError(
                    f"{f.name} is another LoRA variant and cannot be combined with a chain core "
                    f"(chain_type={self.chain_type!r}): remove {f.name}."
                )

    @classmethod
    def from_lora_config(cls, lora_config: LoraConfig, **fields) -> ChainLoraConfig:
        """A chain config with every LoraConfig setting of `lora_config` (targets, r, alpha, dropout...);
        `fields` adds the chain fields and may override a LoRA one (COLA resumes at its link's r)."""
        return cls(**{**_lora_fields(lora_config), **fields})

    def to_lora_config(self) -> LoraConfig:
        """The plain LoraConfig of this adapter's LoRA settings, without the core."""
        return LoraConfig(**_lora_fields(self))

    def fused_split_sizes(self, module_key: str, out_features: int) -> list[int] | None:
        """Output slice sizes of a fused projection named in chain_fused_splits, else None."""
        for pattern, split in (self.chain_fused_splits or {}).items():
            if not re.match(rf"(.*\.)?({pattern})$", module_key):
                continue
            if isinstance(split, int):
                if out_features % split:
                    raise ValueError(
                        f"chain_fused_splits[{pattern!r}]={split}: module '{module_key}' has {out_features} "
                        f"outputs, not divisible into {split} equal slices; give the slice sizes as a list."
                    )
                return [out_features // split] * split
            if sum(split) != out_features:
                raise ValueError(
                    f"chain_fused_splits[{pattern!r}]={list(split)} sums to {sum(split)}, but module "
                    f"'{module_key}' has {out_features} outputs."
                )
            return list(split)
        return None

    def to_dict(self) -> dict:
        serialised = super().to_dict()
        serialised["peft_type"] = CHAIN_PEFT_TYPE
        return serialised


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_chain_dims(dims, r: int, key: str, r_key: str) -> None:
    """LinChain's link dims d0..dn: positive, at least two, d0 = dn = r. `key` names the setting in errors."""
    if not isinstance(dims, (list, tuple)) or len(dims) < 2 or not all(_is_positive_int(d) for d in dims):
        raise ValueError(
            f"{key}={dims} must be a list of at least two positive integers d0..dn, e.g. [{r}, {r}, {r}, {r}]."
        )
    if dims[0] != r or dims[-1] != r:
        raise ValueError(
            f"{key}={list(dims)} must start and end with {r_key}={r} (d0 = dn = r), e.g. [{r}, {2 * r}, {r}]."
        )


def check_fused_splits(splits: dict, key: str) -> None:
    """Fused-projection splits: a number of equal slices (>= 2) or a list of positive slice sizes per module."""
    for pattern, split in splits.items():
        valid = (
            split >= 2
            if _is_positive_int(split)
            else (isinstance(split, (list, tuple)) and len(split) > 0 and all(_is_positive_int(s) for s in split))
        )
        if not valid:
            raise ValueError(
                f"{key}[{pattern!r}]={split!r} must be a number of equal slices (>= 2) or a list of positive slice sizes."
            )


def _lora_fields(config: LoraConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"}
