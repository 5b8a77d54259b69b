"""The axolotl YAML keys of the chain adapters, and their validation.

axolotl merges this model into its config schema; keys it does not declare are
dropped silently, so every key is declared here. The `mode="before"` validator sees
the raw YAML: it refuses what cannot work with a core and closes axolotl's gaps
for plugin adapters (DESIGN.md section 3) before any model is loaded.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .cola import ColaSchedule, check_cola_schedule
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
# COLA runs on these; the plain ones through chain_type "lora"
COLA_ADAPTERS = ("lora", "qlora", *CHAIN_ADAPTERS)
COLA_KEYS = ("cola_knots", "cola_ranks", "cola_reset_optimizer", "cola_merge", "cola_link_warmup_steps")
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

    cola_links: int | None = Field(
        default=None,
        description="Chain of LoRA (COLA): the chain length M, so M - 1 knots; 1 (the default) = no COLA. Works "
        "with adapter: lora, qlora, linchain, moslora and mtlora.",
    )
    cola_knots: list[float | int] | None = Field(
        default=None,
        description="COLA: the M - 1 knots, strictly increasing; fractions of the run's optimizer steps in (0, 1) "
        "or optimizer steps. Default evenly spaced.",
    )
    cola_ranks: list[int] | None = Field(
        default=None,
        description="COLA: the rank of each of the M links (rank step-down), the first = lora_r. Default lora_r "
        "for all.",
    )
    cola_reset_optimizer: bool | None = Field(
        default=None,
        description="COLA: give the optimizer fresh state for each new link (default true, as the paper).",
    )
    cola_merge: Literal["auto", "base", "frozen"] | None = Field(
        default=None,
        description="COLA: where finished links go. base: added into the float base weights; frozen: kept as "
        "frozen low-rank factors beside the base (exact; needed for 4/8-bit bases); auto (default): base for "
        "float32 bases, frozen otherwise.",
    )
    cola_link_warmup_steps: int | None = Field(
        default=None,
        description="COLA: a linear LR warmup over this many steps after each knot, on top of the run's one "
        "schedule (default 0).",
    )

    @model_validator(mode="before")
    @classmethod
    def validate_chain_adapter(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        cola = _validate_cola_keys(data, adapter)
        if adapter not in CHAIN_ADAPTERS:
            _refuse_chain_keys_without_chain_adapter(data, adapter, cola)
            if cola:
                _turn_off_lora_kernels(data, adapter)
                _use_legacy_merge(data, adapter)
            return data
        _refuse_keys_of_other_adapters(data, adapter)
        _validate_chain_keys(data, adapter)
        _refuse_what_assumes_no_core(data, adapter)
        _turn_off_lora_kernels(data, adapter)
        _use_legacy_merge(data, adapter)
        _quantize_base(data)
        return data


def uses_cola(cfg) -> bool:
    return (cfg.get("cola_links") or 1) > 1


def cola_schedule(cfg) -> ColaSchedule:
    """The COLA settings of a YAML dict or a validated cfg."""
    knots, ranks = cfg.get("cola_knots"), cfg.get("cola_ranks")
    return ColaSchedule(
        links=cfg.get("cola_links"),
        knots=tuple(knots) if knots is not None else None,
        ranks=tuple(ranks) if ranks is not None else None,
        merge=cfg.get("cola_merge") or "auto",
        reset_optimizer=cfg.get("cola_reset_optimizer") is not False,
        link_warmup_steps=cfg.get("cola_link_warmup_steps") or 0,
    )


def _validate_cola_keys(data: dict, adapter: str | None) -> bool:
    """Refuse a bad COLA setting; returns whether the config uses COLA."""
    links = data.get("cola_links")
    if links is not None and (not isinstance(links, int) or isinstance(links, bool) or links < 1):
        raise ValueError(f"cola_links={links!r} must be a positive integer (the chain length; 1 = no COLA).")
    if not uses_cola(data):
        for key in COLA_KEYS:
            if data.get(key) is not None:
                raise ValueError(f"{key} is a COLA key, but cola_links is {links}: set cola_links >= 2 or remove {key}.")
        return False
    if adapter not in COLA_ADAPTERS:
        raise ValueError(f"cola_links needs adapter: one of {', '.join(COLA_ADAPTERS)}, not {adapter!r}.")
    schedule = cola_schedule(data)
    check_cola_schedule(schedule, max_steps=data.get("max_steps"))
    refusals = {
        "relora": "ReLoRA is another restart scheme; COLA replaces it",
        "deepspeed": "COLA does not yet reset DeepSpeed's own optimizer and fp32 master copies at a knot",
        "fsdp": "COLA does not yet re-shard the new link and tie sharded weights at a knot under FSDP",
        "fsdp_config": "COLA does not yet re-shard the new link and tie sharded weights at a knot under FSDP",
    }
    _refuse(data, refusals, "cola_links")
    if data.get("peft_init_lora_weights") is False:
        raise ValueError(
            "peft_init_lora_weights: false starts every link with B != 0, so a knot would change the model: "
            "remove it (or use true/gaussian) with cola_links."
        )
    quantized = data.get("load_in_4bit") or data.get("load_in_8bit")
    if schedule.merge == "base" and quantized:
        raise ValueError(
            "cola_merge: base adds finished links into the base weights, which 4-bit/8-bit rounding would lose: "
            "use cola_merge: frozen (or auto) with load_in_4bit/load_in_8bit."
        )
    if schedule.ranks is not None:
        _validate_cola_ranks(data, schedule.ranks)
    return True


def _validate_cola_ranks(data: dict, ranks: tuple[int, ...]) -> None:
    if ranks[0] != data.get("lora_r"):
        raise ValueError(f"cola_ranks={list(ranks)} must start with lora_r={data.get('lora_r')} (the first link).")
    if len(set(ranks)) == 1:
        return
    conflicts = {
        "lora_rank_pattern": "gives layers their own ranks",
        "linchain_dims": "fixes the rank of the chain",
        "mtlora_fused_splits": "fixes the rank of the fused core",
    }
    for key, why in conflicts.items():
        if data.get(key):
            raise ValueError(f"cola_ranks steps the rank down, but {key} {why}: remove one of them.")
    if data.get("linchain_n") not in (None, 3):
        raise ValueError("cola_ranks steps the rank down, which keeps LinChain's default 3 links: remove linchain_n.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "cola_ranks steps the rank down, which gives the link new tensors that DistributedDataParallel "
            "would not synchronise: use one rank for every link (or train on one process)."
        )


def _refuse_chain_keys_without_chain_adapter(data: dict, adapter: str | None, cola: bool) -> None:
    for key in (*ADAPTER_OF_KEY, *CHAIN_KEYS):
        if key == "chain_export_lora" and cola:
            continue  # a COLA run on plain LoRA folds its links into one plain LoRA too
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


def _refuse(data: dict, refusals: dict[str, str], setting: str) -> None:
    """Refuse each key of `refusals` that is set, with its reason."""
    for key, why in refusals.items():
        if data.get(key):
            raise ValueError(f"{key} cannot be used with {setting}: {why}. Remove {key}.")


def _refuse_what_assumes_no_core(data: dict, adapter: str) -> None:
    """Combinations whose math or machinery assumes plain LoRA (no core between A and B)."""
    refusals = {
        "peft_use_dora": "DoRA is another LoRA variant and cannot be combined with a core",
        "relora": "ReLoRA merges plain LoRA only; for chained training use the COLA keys",
        "gptq": "GPTQ layers are not supported by chain adapters; use load_in_4bit (bitsandbytes) instead",
        "lora_target_parameters": "LoRA on raw nn.Parameters is not supported by chain adapters; target modules",
        "flash_attn_fuse_mlp": "the fused MLP bypasses the adapted layers",
    }
    _refuse(data, refusals, f"adapter: {adapter}")
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
                f"{key}: true computes plain LoRA (B A x) and would skip the core of adapter: {adapter} "
                "and COLA's tied links: "
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
            f"adapter: {adapter} and COLA's tied links: use merge_method: legacy (the default for chain adapters "
            "and COLA)."
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
