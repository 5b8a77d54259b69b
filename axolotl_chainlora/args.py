"""The axolotl YAML keys of the chain adapters and of Chain of LoRA: the schema and its validators.

axolotl merges `ChainLoraArgs` into its config schema and drops keys it does not declare, so every
key is declared here with its real default. The `check_*` validators refuse a bad config before any
model loads. Most run on the typed config (`mode="after"`, in the order written, so a later one may
rely on an earlier one). The rules on the adapter and the schedule themselves live once, in
`check_chain_settings` (config.py) and `ColaSchedule` (cola.py): these validators hand them the
YAML's values, translated by the plugin's `chain_config_fields` and `cola_schedule`, and name the
YAML keys. The `mode="before"` ones see the raw YAML: they rewrite what axolotl sets up for
lora/qlora only and a chain adapter needs too (quantization, LoRA kernels),
refuse ReLoRA before axolotl's own ReLoRA checks ask for its settings and a plain-LoRA YAML on a saved
chain adapter, and warn about misspelled keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from peft import PeftConfig
from pydantic import BaseModel, Field, StrictFloat, StrictInt, model_validator

from .cola import COLA_MERGE_MODES, LINK_WARMUP_UNDER_DEEPSPEED, ColaSchedule
from .config import ChainLoraConfig, check_chain_settings
from .cores import DEFAULT_LINCHAIN_FACTORS
from .export import saved_chain_config
from .log import LOG
from .merge import EFFICIENT_MERGE_MATCHES_4BIT_TRAINING
from .plugin import (
    CHAIN_ADAPTERS,
    COLA_ADAPTERS,
    builds_adapter,
    chain_config_fields,
    chain_yaml_keys,
    cola_schedule,
    kernels_on,
    lora_kernels_obstacle,
    require_same_chain,
    reference_is_the_base,
    rl_trainer,
    settle_lora_kernels,
    training_dtype,
    uses_chain_adapter,
    uses_cola,
)

MTLORA_STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
# preference trainers to which axolotl passes the adapter's config only: TRL builds the adapter from it
TRL_BUILDS_ADAPTER = ("dpo", "ipo", "kto")
# keys that belong to one adapter only; the others are for every chain adapter
ADAPTER_OF_KEY = {
    "linchain_dims": "linchain",
    "linchain_n": "linchain",
    "mtlora_structure": "mtlora",
    "mtlora_fused_splits": "mtlora",
}
# the axolotl key of each LoRA setting that check_chain_settings reads (as axolotl's load_lora maps them)
YAML_KEY_OF_LORA_FIELD = {
    "r": "lora_r",
    "rank_pattern": "lora_rank_pattern",
    "init_lora_weights": "peft_init_lora_weights",
    "use_dora": "peft_use_dora",
    "target_parameters": "lora_target_parameters",
    "target_modules": "lora_target_modules",
}
_COLA_DEFAULTS = ColaSchedule()


class ChainLoraArgs(BaseModel):
    """YAML keys for `adapter: linchain | moslora | mtlora` and for Chain of LoRA (`cola_*`)."""

    linchain_n: StrictInt = Field(
        DEFAULT_LINCHAIN_FACTORS,
        ge=1,
        description="adapter: linchain. Number of factors; the chain's dims are lora_r repeated linchain_n + 1 "
        "times (LinChain-3-r by default, the paper's).",
    )
    linchain_dims: list[StrictInt] | None = Field(
        None,
        description="adapter: linchain. The factor dims d0..dn, with d0 = dn = lora_r; e.g. [8, 16, 8] with "
        "lora_r: 8 is LinChain-2-8. Unset: lora_r repeated linchain_n + 1 times.",
    )
    mtlora_structure: Literal["shim", "icfm", "ctcm", "dtsm"] | None = Field(
        None,
        description="adapter: mtlora, required. The transformation core: shim (C), icfm (C C^T), ctcm (C D), "
        "dtsm (C + D).",
    )
    mtlora_fused_splits: dict[str, StrictInt | list[StrictInt]] | None = Field(
        None,
        description="adapter: mtlora. Fused projections (module name, as in lora_rank_pattern) to their output "
        "split: a number of equal slices or a list of slice sizes, e.g. {c_attn: 3} for GPT-2. Each slice keeps "
        "its own B and one core mixes them, as the MTLoRA paper does for GPT-2's qkv.",
    )
    chain_init: Literal["kaiming", "identity", "orthogonal"] = Field(
        ChainLoraConfig.chain_init,
        description="Any chain adapter. Core initialisation: kaiming (the papers'), identity (T = I, training "
        "starts as exact LoRA) or orthogonal.",
    )
    chain_export_lora: bool = Field(
        False,
        description="Any chain adapter, and COLA. After training, also write the adapter folded into an exact "
        "plain LoRA (A' = T A) to {output_dir}/plain_lora, for vLLM and other LoRA servers.",
    )

    cola_links: StrictInt = Field(
        _COLA_DEFAULTS.links,
        description="Chain of LoRA (COLA): the chain length M, so M - 1 knots; 1 = no COLA. Works with "
        "adapter: lora, qlora, linchain, moslora and mtlora.",
    )
    cola_knots: list[StrictFloat | StrictInt] | None = Field(
        None,
        description="COLA: the M - 1 knots, strictly increasing; fractions of the run's optimizer steps in (0, 1) "
        "or optimizer steps. Unset: evenly spaced.",
    )
    cola_ranks: list[StrictInt] | None = Field(
        None,
        description="COLA: the rank of each of the M links (rank step-down), the first = lora_r. Unset: lora_r "
        "for every link.",
    )
    cola_reset_optimizer: bool = Field(
        _COLA_DEFAULTS.reset_optimizer,
        description="COLA: give the optimizer fresh state for each new link, as the paper does.",
    )
    cola_merge: Literal[COLA_MERGE_MODES] = Field(
        _COLA_DEFAULTS.merge,
        description="COLA: where finished links go. base: added into the float base weights; frozen: kept as "
        "frozen low-rank factors beside the base (exact; needed for 4/8-bit bases); auto: base for float32 "
        "bases, frozen otherwise.",
    )
    cola_link_warmup_steps: StrictInt = Field(
        _COLA_DEFAULTS.link_warmup_steps,
        description="COLA: a linear LR warmup over this many steps after each knot, on top of the run's one schedule.",
    )

    # ---- the chain keys

    @model_validator(mode="after")
    def check_chain_keys_belong_to_the_adapter(self):
        cfg = _Keys(self)
        adapter = cfg.get("adapter")
        for key in (*ADAPTER_OF_KEY, "chain_init", "chain_export_lora"):
            if not _is_set(cfg, key) or (key == "chain_export_lora" and uses_cola(cfg)):
                continue  # a COLA run on plain LoRA folds its links into one plain LoRA too
            owner = ADAPTER_OF_KEY.get(key)
            if adapter not in CHAIN_ADAPTERS:
                wanted = owner or " | ".join(CHAIN_ADAPTERS)
                raise ValueError(
                    f"{key} is for adapter: {wanted}, but adapter is {adapter!r}: remove {key} or set adapter."
                )
            if owner not in (None, adapter):
                raise ValueError(f"{key} is for adapter: {owner}, not adapter: {adapter}: remove {key}.")
        return self

    @model_validator(mode="after")
    def check_lora_r(self):
        cfg = _Keys(self)
        if uses_chain_adapter(cfg) and not (isinstance(cfg.get("lora_r"), int) and cfg.get("lora_r") > 0):
            raise ValueError(f"adapter: {cfg.get('adapter')} needs lora_r, a positive integer (e.g. lora_r: 16).")
        return self

    @model_validator(mode="after")
    def check_mtlora_structure(self):
        if getattr(self, "adapter", None) == "mtlora" and self.mtlora_structure is None:
            raise ValueError(f"adapter: mtlora needs mtlora_structure: one of {' | '.join(MTLORA_STRUCTURES)}.")
        return self

    @model_validator(mode="after")
    def check_linchain_n_matches_dims(self):
        if getattr(self, "adapter", None) != "linchain" or self.linchain_dims is None:
            return self
        factors = len(self.linchain_dims) - 1
        if "linchain_n" in self.model_fields_set and self.linchain_n != factors:
            raise ValueError(
                f"linchain_n={self.linchain_n} but linchain_dims={self.linchain_dims} has {factors} factors: "
                "drop linchain_n or make them agree."
            )
        if factors >= 1:
            # the validated cfg then says how many factors the chain has (Ray workers validate it again)
            self.linchain_n = factors
        return self

    @model_validator(mode="after")
    def check_chain_settings(self):
        """ChainLoraConfig's rules (check_chain_settings) on the YAML's values, named by its keys."""
        cfg = _Keys(self)
        if not uses_chain_adapter(cfg):
            return self
        settings = {
            field: cfg.get(key) for field, key in YAML_KEY_OF_LORA_FIELD.items() if cfg.get(key) is not None
        } | chain_config_fields(cfg)
        yaml_key = {
            **YAML_KEY_OF_LORA_FIELD,
            "chain_type": "adapter",
            "chain_dims": "linchain_dims" if self.linchain_dims is not None else "linchain_n",
            "chain_fused_splits": "mtlora_fused_splits",
        }
        try:
            check_chain_settings(settings, name=lambda field: yaml_key.get(field, field))
        except ValueError as error:
            raise ValueError(f"adapter: {cfg.get('adapter')}: {error}") from error
        return self

    @model_validator(mode="after")
    def check_host_features_without_core(self):
        """axolotl features whose math or machinery assumes plain LoRA (no core between A and B)."""
        cfg = _Keys(self)
        if not uses_chain_adapter(cfg):
            return self
        refusals = {
            "gptq": "GPTQ layers are not supported by chain adapters; use load_in_4bit (bitsandbytes) instead",
            "flash_attn_fuse_mlp": "the fused MLP bypasses the adapted layers",
            "use_onebitllms": "axolotl swaps the linear layers for BitNet ones, which it refuses for LoRA/QLoRA too",
        }
        _refuse(cfg, refusals, f"adapter: {cfg.get('adapter')}")
        if getattr(cfg.get("peft"), "loftq_config", None):
            raise ValueError(
                "peft.loftq_config (LoftQ init) assumes LoRA without a core: "
                f"remove it for adapter: {cfg.get('adapter')}."
            )
        return self

    @model_validator(mode="after")
    def check_vllm_weight_sync(self):
        """GRPO's vLLM sync must see the adapter through PEFT's merge (the chain layers merge B T A and the tied
        links exactly); axolotl's asynchronous trainer instead adds s B A from lora_A and lora_B itself, and
        vllm_lora_sync posts the saved adapter, whose cores vLLM does not load."""
        cfg = _Keys(self)
        trl = cfg.get("trl")
        if not builds_adapter(cfg) or not getattr(trl, "use_vllm", False):
            return self
        setting = "cola_links" if uses_cola(cfg) else f"adapter: {cfg.get('adapter')}"
        asynchronous = "asynchronous GRPO sends vLLM W + s B A, without the core and the tied links"
        reasons = {
            "async_prefetch": asynchronous,
            "use_data_producer": asynchronous,
            "vllm_lora_sync": "LoRA sync posts the saved adapter, whose cores and tied links vLLM cannot load",
        }
        for key, why in reasons.items():
            if getattr(trl, key, False):
                raise ValueError(
                    f"trl.{key} cannot be used with trl.use_vllm and {setting}: axolotl's {why}. Remove trl.{key}: "
                    "the synchronous trainer merges the adapter exactly before each sync."
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def check_rl_reentrant_checkpointing(cls, data: Any) -> Any:
        # axolotl's refusal for qlora (an upstream TRL bug), for a chain adapter on a 4-bit base
        if not isinstance(data, dict) or not uses_chain_adapter(data) or not data.get("load_in_4bit"):
            return data
        reentrant = (data.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant")
        gpus = (data.get("capabilities") or {}).get("n_gpu", 1)
        if data.get("rl") and data.get("gradient_checkpointing") and reentrant and gpus > 1:
            raise ValueError(
                f"gradient_checkpointing_kwargs.use_reentrant: true is not supported for distributed RL training of "
                f"adapter: {data['adapter']} on a 4-bit base (as for QLoRA, a TRL bug): set use_reentrant: false."
            )
        return data

    # ---- the COLA keys

    @model_validator(mode="after")
    def check_cola_schedule(self):
        """ColaSchedule's rules on the cola_* keys, and its knots against max_steps."""
        cfg = _Keys(self)
        if not uses_cola(cfg):
            for key in ("cola_knots", "cola_ranks", "cola_reset_optimizer", "cola_merge", "cola_link_warmup_steps"):
                if _is_set(cfg, key):
                    raise ValueError(
                        f"{key} is a COLA key, but cola_links is {self.cola_links}: "
                        f"set cola_links >= 2 or remove {key}."
                    )
        schedule = cola_schedule(cfg)
        if schedule.links > 1 and cfg.get("adapter") not in COLA_ADAPTERS:
            raise ValueError(
                f"cola_links needs adapter: one of {', '.join(COLA_ADAPTERS)}, not {cfg.get('adapter')!r}."
            )
        if schedule.links > 1 and cfg.get("max_steps"):
            schedule.knot_steps(cfg.get("max_steps"))
        return self

    @model_validator(mode="after")
    def check_cola_engine(self):
        """What a knot can reset on each engine (engines.py): FSDP2, and DeepSpeed with Adam on the adapter alone."""
        cfg = _Keys(self)
        if not uses_cola(cfg):
            return self
        fsdp_config = cfg.get("fsdp_config") or {}
        fsdp_version = cfg.get("fsdp_version") or fsdp_config.get("fsdp_version") or fsdp_config.get("version")
        if cfg.get("fsdp") or (fsdp_config and str(fsdp_version) != "2"):
            raise ValueError(
                "cola_links under FSDP needs FSDP2, whose DTensor shards a knot rewrites: set fsdp_version: 2 "
                "(FSDP1's flat parameters are not supported)."
            )
        if not cfg.get("deepspeed"):
            return self
        if cfg.get("cola_link_warmup_steps"):
            raise ValueError(LINK_WARMUP_UNDER_DEEPSPEED)
        optimizer = str(cfg.get("optimizer") or "adamw_torch_fused")  # axolotl's default
        if "adam" not in optimizer or any(word in optimizer for word in ("8bit", "bnb", "paged")):
            raise ValueError(
                f"optimizer: {optimizer} cannot be used with cola_links under DeepSpeed: a knot resets Adam's state "
                "(moments and step) in DeepSpeed's fp32 partitions, which bitsandbytes' quantized or paged state "
                "and other optimizers do not keep. Use adamw_torch or adamw_torch_fused (or the deepspeed config's "
                "own Adam)."
            )
        if cfg.get("lora_modules_to_save"):
            raise ValueError(
                "lora_modules_to_save cannot be used with cola_links under DeepSpeed: DeepSpeed keeps Adam's step "
                "count per optimizer group, which the link would share with those modules, so a knot could not "
                "reset the link alone. Remove lora_modules_to_save, or train without deepspeed."
            )
        return self

    @model_validator(mode="after")
    def check_cola_links_start_at_zero(self):
        cfg = _Keys(self)
        if uses_cola(cfg) and cfg.get("peft_init_lora_weights") is False:
            raise ValueError(
                "peft_init_lora_weights: false starts every link with B != 0, so a knot would change the model: "
                "remove it (or use true/gaussian) with cola_links."
            )
        return self

    @model_validator(mode="after")
    def check_cola_merge_on_a_quantized_base(self):
        cfg = _Keys(self)
        quantized = cfg.get("load_in_4bit") or cfg.get("load_in_8bit")
        if quantized and uses_cola(cfg) and self.cola_merge == "base":
            raise ValueError(
                "cola_merge: base adds finished links into the base weights, which 4-bit/8-bit rounding would lose: "
                "use cola_merge: frozen (or auto) with load_in_4bit/load_in_8bit."
            )
        return self

    @model_validator(mode="after")
    def check_cola_on_lora_under_trl_built_adapters(self):
        cfg = _Keys(self)
        rl = rl_trainer(cfg)
        if uses_cola(cfg) and cfg.get("adapter") in ("lora", "qlora") and rl in TRL_BUILDS_ADAPTER:
            raise ValueError(
                f"cola_links with adapter: {cfg.get('adapter')} cannot be used with rl: {rl}: axolotl hands TRL a plain "
                "LoraConfig there and TRL builds LoRA layers, which cannot hold COLA's tied links. Use a chain "
                "adapter (adapter: linchain, moslora or mtlora) with cola_links, or remove cola_links."
            )
        return self

    @model_validator(mode="after")
    def check_the_adapter_to_continue(self):
        cfg = _Keys(self)
        directory = cfg.get("lora_model_dir")
        # a hub id is read, and checked, when the adapter loads
        if builds_adapter(cfg) and directory and (Path(directory) / "adapter_config.json").is_file():
            require_same_chain(cfg, PeftConfig.from_pretrained(directory))
        return self

    @model_validator(mode="after")
    def check_no_adapter_to_continue_under_trl_built_adapters(self):
        cfg = _Keys(self)
        rl = rl_trainer(cfg)
        continued = cfg.get("lora_model_dir") and not cfg.get("merge_lora")
        if builds_adapter(cfg) and rl in TRL_BUILDS_ADAPTER and continued:
            raise ValueError(
                f"lora_model_dir={cfg.get('lora_model_dir')} would not be loaded with rl: {rl}: axolotl hands TRL the "
                "adapter's config only and TRL builds a fresh adapter, so the run would start from the base model. "
                "To train on top of that adapter, merge it into the base first (axolotl-chainlora export DIR OUT_DIR "
                "--merge --base-model BASE, or axolotl merge-lora) and set base_model to the merged model; or remove "
                "lora_model_dir."
            )
        return self

    @model_validator(mode="after")
    def check_cola_merge_keeps_the_reference(self):
        cfg = _Keys(self)
        if uses_cola(cfg) and self.cola_merge == "base" and reference_is_the_base(cfg):
            raise ValueError(
                f"cola_merge: base with rl: {rl_trainer(cfg)} would add finished links "
                "into the base weights, and the trainer's reference model (the starting adapter, or none, on the "
                "policy's base weights) would move with them: use cola_merge: frozen (or auto)."
            )
        return self

    @model_validator(mode="after")
    def check_cola_rank_step_down(self):
        cfg = _Keys(self)
        ranks = self.cola_ranks if uses_cola(cfg) else None
        if not ranks:
            return self
        if ranks[0] != cfg.get("lora_r"):
            raise ValueError(f"cola_ranks={list(ranks)} must start with lora_r={cfg.get('lora_r')} (the first link).")
        if len(set(ranks)) == 1:
            return self
        conflicts = {
            "lora_rank_pattern": "gives layers their own ranks",
            "linchain_dims": "fixes the rank of the chain",
        }
        for key, why in conflicts.items():
            if cfg.get(key):
                raise ValueError(f"cola_ranks steps the rank down, but {key} {why}: remove one of them.")
        if _is_set(cfg, "linchain_n"):
            raise ValueError(
                f"cola_ranks steps the rank down, which keeps LinChain's default {DEFAULT_LINCHAIN_FACTORS} "
                "factors: remove linchain_n."
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def check_chain_without_relora(cls, data: Any) -> Any:
        # on the raw YAML: axolotl's own ReLoRA checks would otherwise ask for its settings first
        if isinstance(data, dict) and data.get("relora"):
            if uses_chain_adapter(data):
                _refuse(data, {"relora": "ReLoRA merges plain LoRA only; for chained training use the COLA keys"},
                        f"adapter: {data['adapter']}")  # fmt: skip
            if uses_cola(data):
                _refuse(data, {"relora": "ReLoRA is another restart scheme; COLA replaces it"}, "cola_links")
        return data

    # ---- what axolotl does for lora/qlora only, done for chain adapters and COLA

    @model_validator(mode="before")
    @classmethod
    def choose_lora_kernels(cls, data: Any) -> Any:
        """axolotl's LoRA kernels compute chain adapters and COLA's tied links exactly (kernels.py): on as axolotl
        turns them on for lora/qlora, refused where they cannot be exact."""
        if not isinstance(data, dict) or not builds_adapter(data):
            return data
        settle_lora_kernels(data)
        on = kernels_on(data)
        obstacle = lora_kernels_obstacle(data)
        if on and obstacle:
            raise ValueError(
                f"{on[0]}: true: axolotl's LoRA kernels cannot compute adapter: {data.get('adapter')} exactly here: "
                f"{obstacle}. Set {', '.join(on)} to false, or remove them."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def choose_merge_method(cls, data: Any) -> Any:
        # axolotl < 0.21's memory-efficient merge would round the embeddings and head through NF4 too (merge.py)
        if isinstance(data, dict) and builds_adapter(data) and not EFFICIENT_MERGE_MATCHES_4BIT_TRAINING:
            data["merge_method"] = data.get("merge_method") or "legacy"
        return data

    @model_validator(mode="before")
    @classmethod
    def check_lora_reads_no_chain_adapter(cls, data: Any) -> Any:
        """adapter: lora/qlora would read a saved chain adapter through plain-LoRA machinery (axolotl's LoRA
        kernels read B A without the core; its merge adds B A from the file): refused, naming the fix."""
        if not isinstance(data, dict) or data.get("adapter") not in ("lora", "qlora") or uses_cola(data):
            return data
        saved = saved_chain_config(data["lora_model_dir"]) if data.get("lora_model_dir") else None
        if saved is None:
            return data
        raise ValueError(
            f"lora_model_dir={data['lora_model_dir']} holds a chain adapter (peft_type LORA_CHAIN, chain_type "
            f"{saved.get('chain_type')}), which adapter: {data['adapter']} would read as plain LoRA: set "
            f"{chain_yaml_keys(saved)}, or fold it into a plain LoRA first (axolotl-chainlora export "
            f"{data['lora_model_dir']} OUT_DIR) and set lora_model_dir: OUT_DIR."
        )

    @model_validator(mode="before")
    @classmethod
    def quantize_base(cls, data: Any) -> Any:
        """axolotl quantizes the base only for lora/qlora: ask the model loader for what its qlora path asks."""
        if not isinstance(data, dict) or not uses_chain_adapter(data):
            return data
        if not (data.get("load_in_4bit") or data.get("load_in_8bit")):
            return data
        if data.get("load_in_4bit") and data.get("load_in_8bit"):
            raise ValueError("load_in_4bit and load_in_8bit are both set: choose one.")
        if data.get("load_in_4bit"):
            dtype = str(training_dtype(data)).removeprefix("torch.")
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
        return data

    # ---- typos

    @model_validator(mode="before")
    @classmethod
    def warn_about_misspelled_keys(cls, data: Any) -> Any:
        """axolotl drops keys its schema does not declare: a typo of one of ours would train with the default."""
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in cls.model_fields:
                continue
            meant = [ours for ours in ChainLoraArgs.model_fields if _one_edit_apart(key, ours)]
            if meant:
                LOG.warning("%s is not a config key and is ignored; did you mean %s?", key, " or ".join(meant))
        return data


class _Keys:
    """A config model read by YAML key, as the plugin's helpers read a cfg: a key the model lacks is None."""

    def __init__(self, model: BaseModel):
        self.model = model

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self.model, key, None)
        return default if value is None else value


def _is_set(cfg: _Keys, key: str) -> bool:
    """Whether the YAML sets `key` to other than its default (a cfg validated before carries every default)."""
    return cfg.get(key) not in (None, ChainLoraArgs.model_fields[key].default)


def _refuse(data, refusals: dict[str, str], setting: str) -> None:
    """Refuse each key of `refusals` that is set, with its reason."""
    for key, why in refusals.items():
        if data.get(key):
            raise ValueError(f"{key} cannot be used with {setting}: {why}. Remove {key}.")


def _one_edit_apart(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours turns a into b."""
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
        return len(diff) == 1 or swapped
    shorter, longer = sorted((a, b), key=len)
    return len(longer) == len(shorter) + 1 and any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))
