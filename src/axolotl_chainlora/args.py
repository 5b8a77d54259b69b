"""The axolotl YAML keys of the chain adapters, and their validation.

axolotl merges this model into its config schema; keys it does not declare are
dropped silently, so every key is declared here. The `mode="before"` validator sees
the raw YAML: it refuses what cannot work with a core and closes axolotl's gaps
for plugin adapters (DESIGN.md section 3) before any model is loaded.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .config import SUPPORTED_LORA_INITS, check_chain_dims, check_fused_splits

# under axolotl's logger, whose INFO lines axolotl shows (it hides INFO from other loggers)
LOG = logging.getLogger("axolotl.integrations.chainlora")

CHAIN_ADAPTERS = ("linchain", "moslora", "mtlora")
MTLORA_STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
# keys that belong to one adapter only
ADAPTER_OF_KEY = {
    "linchain_dims": "linchain",
    "linchain_n": "linchain",
    "mtlora_structure": "mtlora",
    "mtlora_fused_splits": "mtlora",
}
# keys for any chain adapter
CHAIN_KEYS = ("chain_init", "chain_export_lora")
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class ChainLoraArgs(BaseModel):
    """YAML keys for `adapter: linchain | moslora | mtlora`."""

    linchain_n: int | None = Field(
        default=None,
        ge=1,
        description="adapter: linchain. Number of links; the chain is lora_r repeated linchain_n + 1 times. "
        "Default 3 (LinChain-3-r, the paper's default).",
    )
    linchain_dims: list[int] | None = Field(
        default=None,
        description="adapter: linchain. The link dims d0..dn, with d0 = dn = lora_r; e.g. [8, 16, 8] with "
        "lora_r: 8 is LinChain-2-8. Default: lora_r repeated linchain_n + 1 times.",
    )
    mtlora_structure: Literal["shim", "icfm", "ctcm", "dtsm"] | None = Field(
        default=None,
        description="adapter: mtlora, required. The transformation core: shim (C), icfm (C C^T), ctcm (C D), "
        "dtsm (C + D).",
    )
    mtlora_fused_splits: dict[str, int | list[int]] | None = Field(
        default=None,
        description="adapter: mtlora. Fused projections (module name, as in lora_rank_pattern) to their output "
        "split: a number of equal slices or a list of slice sizes, e.g. {c_attn: 3} for GPT-2. Each slice keeps "
        "its own B and one core mixes them, as the MTLoRA paper does for GPT-2's qkv.",
    )
    chain_init: Literal["kaiming", "identity", "orthogonal"] | None = Field(
        default=None,
        description="Any chain adapter. Core initialisation: kaiming (the papers' default), identity (T = I, "
        "training starts as exact LoRA) or orthogonal.",
    )
    chain_export_lora: bool | None = Field(
        default=None,
        description="Any chain adapter. After training, also write the adapter folded into an exact plain "
        "LoRA (A' = T A, same r and alpha) to {output_dir}/plain_lora, for vLLM and other LoRA servers.",
    )

    @model_validator(mode="before")
    @classmethod
    def validate_chain_adapter(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        if adapter not in CHAIN_ADAPTERS:
            _refuse_chain_keys_without_chain_adapter(data, adapter)
            return data
        _refuse_keys_of_other_adapters(data, adapter)
        _validate_chain_keys(data, adapter)
        _refuse_what_assumes_no_core(data, adapter)
        _turn_off_lora_kernels(data, adapter)
        _use_legacy_merge(data, adapter)
        _quantize_base(data)
        return data


def _refuse_chain_keys_without_chain_adapter(data: dict, adapter: str | None) -> None:
    for key in (*ADAPTER_OF_KEY, *CHAIN_KEYS):
        if data.get(key) is not None:
            wanted = ADAPTER_OF_KEY.get(key, " | ".join(CHAIN_ADAPTERS))
            raise ValueError(
                f"{key} is for adapter: {wanted}, but adapter is {adapter!r}: remove {key} or set adapter."
            )


def _refuse_keys_of_other_adapters(data: dict, adapter: str) -> None:
    for key, owner in ADAPTER_OF_KEY.items():
        if owner != adapter and data.get(key) is not None:
            raise ValueError(f"{key} is for adapter: {owner}, not adapter: {adapter}: remove {key}.")


def _validate_chain_keys(data: dict, adapter: str) -> None:
    r = data.get("lora_r")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter: {adapter} needs lora_r, a positive integer (e.g. lora_r: 16).")
    if adapter == "mtlora" and data.get("mtlora_structure") is None:
        raise ValueError(f"adapter: mtlora needs mtlora_structure: one of {' | '.join(MTLORA_STRUCTURES)}.")
    n = data.get("linchain_n")
    if n not in (None, 3) and data.get("lora_rank_pattern"):
        raise ValueError(
            f"linchain_n={n} cannot be combined with lora_rank_pattern (per-layer ranks get the default 3 links): "
            "drop one of them."
        )
    dims = data.get("linchain_dims")
    if dims is not None:
        check_chain_dims(dims, r, key="linchain_dims", r_key="lora_r")
        if n is not None and n != len(dims) - 1:
            raise ValueError(
                f"linchain_n={n} but linchain_dims={dims} has {len(dims) - 1} links: drop linchain_n or make them agree."
            )
        if data.get("lora_rank_pattern"):
            raise ValueError(
                "linchain_dims fixes the rank of every layer and cannot be combined with lora_rank_pattern: "
                "drop linchain_dims (each layer then gets linchain_n + 1 copies of its own rank)."
            )
    if data.get("mtlora_fused_splits"):
        check_fused_splits(data["mtlora_fused_splits"], key="mtlora_fused_splits")


def _refuse_what_assumes_no_core(data: dict, adapter: str) -> None:
    """Combinations whose math or machinery assumes plain LoRA (no core between A and B)."""
    refusals = {
        "peft_use_dora": "DoRA is another LoRA variant and cannot be combined with a core",
        "relora": "ReLoRA merges plain LoRA only; for chained training use the COLA keys",
        "gptq": "GPTQ layers are not supported by chain adapters; use load_in_4bit (bitsandbytes) instead",
        "lora_target_parameters": "LoRA on raw nn.Parameters is not supported by chain adapters; target modules",
        "flash_attn_fuse_mlp": "the fused MLP bypasses the adapted layers",
    }
    for key, why in refusals.items():
        if data.get(key):
            raise ValueError(f"{key} cannot be used with adapter: {adapter}: {why}. Remove {key}.")
    init = data.get("peft_init_lora_weights")
    if init is not None and init not in SUPPORTED_LORA_INITS:
        raise ValueError(
            f"peft_init_lora_weights={init!r} builds A and B for LoRA without a core and would be wrong with "
            f"adapter: {adapter}: use one of {SUPPORTED_LORA_INITS} or remove it."
        )
    if (data.get("peft") or {}).get("loftq_config"):
        raise ValueError(
            f"peft.loftq_config (LoftQ init) assumes LoRA without a core: remove it for adapter: {adapter}."
        )


def _turn_off_lora_kernels(data: dict, adapter: str) -> None:
    # axolotl's Triton LoRA kernels compute B A x directly and would skip the core
    for key in LORA_KERNELS:
        if data.get(key):
            raise ValueError(
                f"{key}: true computes plain LoRA (B A x) and would skip the core of adapter: {adapter}: "
                f"set {key}: false or remove it."
            )
        data[key] = False
    LOG.info(
        "adapter: %s: axolotl's LoRA kernels (%s) are off; they know nothing of cores", adapter, ", ".join(LORA_KERNELS)
    )


def _use_legacy_merge(data: dict, adapter: str) -> None:
    # the memory-efficient merge applies B A * s from the safetensors file and would drop the core
    if data.get("merge_method") == "memory_efficient":
        raise ValueError(
            f"merge_method: memory_efficient merges plain LoRA (B A) from the file and would drop the core of "
            f"adapter: {adapter}: use merge_method: legacy (the default for chain adapters)."
        )
    data["merge_method"] = "legacy"


def _quantize_base(data: dict) -> None:
    """axolotl quantizes the base only for lora/qlora; do what its qlora path does for ours."""
    if not (data.get("load_in_4bit") or data.get("load_in_8bit")):
        return
    if data.get("load_in_4bit") and data.get("load_in_8bit"):
        raise ValueError("load_in_4bit and load_in_8bit are both set: choose one.")
    if data.get("load_in_4bit"):
        dtype = _compute_dtype(data)
        quantization = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": dtype,
        }
    else:
        quantization = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    quantization.update(data.get("bnb_config_kwargs") or {})
    model_kwargs = dict(data.get("model_kwargs") or data.get("overrides_of_model_kwargs") or {})
    # a config validated before (Ray workers validate again) already carries exactly this
    if model_kwargs.get("quantization_config", quantization) != quantization:
        raise ValueError(
            "model_kwargs.quantization_config is set together with load_in_4bit/load_in_8bit: keep one of them."
        )
    model_kwargs["quantization_config"] = quantization
    data.pop("overrides_of_model_kwargs", None)
    data["model_kwargs"] = model_kwargs


def _compute_dtype(data: dict) -> str:
    """The dtype axolotl will train in (its resolve_dtype): 4-bit layers compute in it, as for qlora."""
    bf16 = data.get("bf16")
    if bf16 == "auto" and not data.get("fp16"):
        from transformers.utils import is_torch_bf16_gpu_available

        bf16 = is_torch_bf16_gpu_available()
        if not bf16:
            return "float16"
    if bf16 is True or data.get("torch_dtype") in ("bfloat16", "bf16"):
        return "bfloat16"
    if data.get("fp16") or data.get("torch_dtype") in ("float16", "fp16"):
        return "float16"
    return "float32"


def chain_config_fields(cfg) -> dict[str, Any]:
    """The ChainLoraConfig fields of a validated axolotl cfg with a chain adapter."""
    adapter = cfg.adapter
    fields: dict[str, Any] = {"chain_init": cfg.chain_init or "kaiming"}
    if adapter == "linchain":
        fields["chain_type"] = "linchain"
        if cfg.linchain_dims:
            fields["chain_dims"] = list(cfg.linchain_dims)
        elif cfg.linchain_n and not cfg.lora_rank_pattern:
            fields["chain_dims"] = [cfg.lora_r] * (cfg.linchain_n + 1)
    elif adapter == "moslora":
        fields["chain_type"] = "moslora"
    else:
        fields["chain_type"] = f"mtlora_{cfg.mtlora_structure}"
        if cfg.mtlora_fused_splits:
            fields["chain_fused_splits"] = dict(cfg.mtlora_fused_splits)
    return fields
