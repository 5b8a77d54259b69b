"""ChainLoraConfig: a peft.LoraConfig that puts a learnable core T between A and B, and its rules."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft import LoraConfig

from .cores import CHAIN_INITS, CHAIN_TYPES, DEFAULT_LINCHAIN_FACTORS
from .dispatch import chain_layer_mapping

# adapter_config.json says this instead of "LORA": plain PEFT then fails to load our adapters
# instead of silently dropping the cores (measured: outputs off by up to 0.97)
CHAIN_PEFT_TYPE = "LORA_CHAIN"
# bumped whenever the saved layout changes; adapters of any other format are refused
CHAIN_FORMAT_VERSION = 1
# PEFT inits that build A and B for T = I (PiSSA, OLoRA, LoftQ, ...) would be wrong with a core
SUPPORTED_LORA_INITS = (True, False, "gaussian")
# LoraConfig fields of other LoRA variants (DoRA, aLoRA, ...): each assumes it is the only one
LORA_VARIANT_FIELDS = tuple(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))


@dataclass
class ChainLoraConfig(LoraConfig):
    """LoRA with a learnable core T between A and B: MoSLoRA, LinChain and MTLoRA as PEFT LoRA variants.

    MoSLoRA: Wu, Wang, Zhao, Wong, "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv:2406.11909.
    LinChain: Wang, Zuo, Xuan, Li, Wei, "Linear Chain Transformation: Expanding Optimization Dynamics
    for Fine-Tuning Large Language Models", arXiv:2411.00039.
    MTLoRA: Liang, Wang, Li, Zeng, "Matrix-Transformation Based Low-Rank Adaptation", arXiv:2403.07440.

        y = W0 x + s * B T A dropout(x),    s = lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora)

    with A (r x d_in) and B (d_out x r) as in LoRA and T (r x r) built by `chain_type`:
    `moslora` M; `linchain` W1 @ ... @ Wn; `mtlora_shim` C; `mtlora_icfm` C @ C^T; `mtlora_ctcm` C @ D;
    `mtlora_dtsm` C + D; `lora` I (no core: plain LoRA in the chain layers, for Chain of LoRA).
    Works with `peft.get_peft_model`; saved adapters say `"peft_type": "LORA_CHAIN"`.

    Args:
        chain_type: the core, one of `CHAIN_TYPES`.
        chain_dims: `linchain` only, the factor dims d0..dn with d0 = dn = r; default [r, r, r, r].
        chain_init: `kaiming` (the papers'), `identity` (T = I: training starts as exact LoRA) or `orthogonal`.
        chain_fused_splits: `mtlora_*` only: fused projections to their output split; each slice keeps its
            own rank-r B and one (k r) x (k r) core mixes the k subspaces.
        cola_tied_ranks: set by Chain of LoRA training: the ranks of the links tied into this adapter.
        chain_format_version: the saved layout's version; set automatically.
        **kwargs: every `peft.LoraConfig` argument.

    Raises:
        ValueError: a setting no chain adapter can honour (see `check_chain_settings`), or an adapter
            saved in another format.
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
            "help": "linchain only: dims d0..dn of the factors W_i (d_{i-1} x d_i), with d0 = dn = r. "
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
        if self.chain_format_version != CHAIN_FORMAT_VERSION:
            raise ValueError(
                f"chain_format_version={self.chain_format_version}: this adapter was saved by an "
                f"axolotl-chainlora whose format differs from this install's ({CHAIN_FORMAT_VERSION}). "
                "Install the axolotl-chainlora release that wrote it, or re-export it from there."
            )
        check_chain_settings(vars(self))
        if self.chain_dims is not None:
            self.chain_dims = list(self.chain_dims)
        if self.cola_tied_ranks is not None and not (
            isinstance(self.cola_tied_ranks, (list, tuple)) and all(_is_positive_int(r) for r in self.cola_tied_ranks)
        ):
            raise ValueError(f"cola_tied_ranks={self.cola_tied_ranks!r} must be a list of positive integers.")
        self._register_custom_module(chain_layer_mapping())

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


def check_chain_settings(settings: Mapping[str, Any], name: Callable[[str], str] = str) -> None:
    """Every rule on a chain adapter's settings, written once.

    `settings` maps ChainLoraConfig field names to values (absent: unset). `name` turns a field name into
    the name the user wrote it under: ChainLoraConfig names its fields, the axolotl plugin its YAML keys.
    """
    chain_type, r = settings.get("chain_type"), settings.get("r")
    if chain_type not in CHAIN_TYPES:
        raise ValueError(f"{name('chain_type')}={chain_type!r} is not supported: use one of {', '.join(CHAIN_TYPES)}.")
    if "chain_init" in settings and settings["chain_init"] not in CHAIN_INITS:
        raise ValueError(
            f"{name('chain_init')}={settings['chain_init']!r} is not supported: use one of {', '.join(CHAIN_INITS)}."
        )
    dims = settings.get("chain_dims")
    if dims is not None:
        if chain_type != "linchain":
            raise ValueError(
                f"{name('chain_dims')} is for chain_type='linchain' only, not {chain_type!r}: "
                f"remove {name('chain_dims')}."
            )
        _check_chain_dims(dims, r, name)
        if settings.get("rank_pattern"):
            raise ValueError(
                f"{name('chain_dims')} fixes the rank of every layer and cannot be combined with "
                f"{name('rank_pattern')}: remove {name('chain_dims')} (each layer then gets "
                f"LinChain-{DEFAULT_LINCHAIN_FACTORS} of its own rank) or {name('rank_pattern')}."
            )
    splits = settings.get("chain_fused_splits")
    if splits:
        if not chain_type.startswith("mtlora_"):
            raise ValueError(
                f"{name('chain_fused_splits')} is for the mtlora_* chain types only, not {chain_type!r}: "
                f"remove {name('chain_fused_splits')}."
            )
        _check_fused_splits(splits, name)
        if settings.get("lora_bias"):
            raise ValueError(
                f"{name('lora_bias')}=True is not supported with {name('chain_fused_splits')}: "
                f"set {name('lora_bias')}=False."
            )
    _refuse_what_assumes_no_core(settings, name)


def _check_chain_dims(dims, r: int, name: Callable[[str], str]) -> None:
    """LinChain's factor dims d0..dn: positive, at least two, d0 = dn = r."""
    if not isinstance(dims, (list, tuple)) or len(dims) < 2 or not all(_is_positive_int(d) for d in dims):
        raise ValueError(
            f"{name('chain_dims')}={dims} must be a list of at least two positive integers d0..dn, "
            f"e.g. [{r}, {r}, {r}, {r}]."
        )
    if dims[0] != r or dims[-1] != r:
        raise ValueError(
            f"{name('chain_dims')}={list(dims)} must start and end with {name('r')}={r} (d0 = dn = r), "
            f"e.g. [{r}, {2 * r}, {r}]."
        )


def _check_fused_splits(splits: dict, name: Callable[[str], str]) -> None:
    """Fused-projection splits: a number of equal slices (>= 2) or a list of positive slice sizes per module."""
    for pattern, split in splits.items():
        valid = (
            split >= 2
            if _is_positive_int(split)
            else (isinstance(split, (list, tuple)) and len(split) > 0 and all(_is_positive_int(s) for s in split))
        )
        if not valid:
            raise ValueError(
                f"{name('chain_fused_splits')}[{pattern!r}]={split!r} must be a number of equal slices (>= 2) "
                "or a list of positive slice sizes."
            )


def _refuse_what_assumes_no_core(settings: Mapping[str, Any], name: Callable[[str], str]) -> None:
    """PEFT features whose math assumes plain LoRA, T = I."""
    init = settings.get("init_lora_weights", True)  # absent: PEFT's default
    if init not in SUPPORTED_LORA_INITS:
        raise ValueError(
            f"{name('init_lora_weights')}={init!r} builds A and B for a LoRA without a core (T = I) and would be "
            f"wrong here: use one of {SUPPORTED_LORA_INITS}."
        )
    if settings.get("target_parameters"):
        raise ValueError(
            f"{name('target_parameters')} (LoRA on raw nn.Parameters) is not supported by chain adapters: "
            f"remove it and target the modules with {name('target_modules')}."
        )
    for variant in LORA_VARIANT_FIELDS:
        if settings.get(variant):
            raise ValueError(
                f"{name(variant)} is another LoRA variant and cannot be combined with a chain core "
                f"(chain_type={settings.get('chain_type')!r}): remove {name(variant)}."
            )


def _lora_fields(config: LoraConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"}
