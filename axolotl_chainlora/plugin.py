"""The axolotl plugin: `adapter: linchain | moslora | mtlora` and the `cola_*` keys in an ordinary axolotl YAML.

Thin on purpose: it translates the YAML into a ChainLoraConfig and a ColaSchedule and closes the
gaps axolotl leaves for plugin adapters (it quantizes and prepares only lora/qlora bases, loads
only stock LoRA from lora_model_dir, and builds lora/qlora adapters without asking plugins).
axolotl >= 0.21 loads it for every config through the `axolotl.plugins` entry point, so every
hook does nothing unless the config uses a chain adapter or COLA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import peft.utils.other as peft_other
import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.loaders.adapter import load_lora
from axolotl.utils.config import resolve_dtype
from axolotl.utils.dict import DictDefault
from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
from axolotl.utils.train import determine_last_checkpoint
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from .cola import ColaCallback, ColaSchedule, copy_tied_links
from .config import ChainLoraConfig
from .cores import DEFAULT_LINCHAIN_FACTORS, default_chain_dims
from .export import ADAPTER_WEIGHTS, fold_to_lora
from .kernels import kernels_read_chain_adapters, use_chain_lora_parameters
from .log import LOG
from .merge import use_folding_merge

CHAIN_ADAPTERS = ("linchain", "moslora", "mtlora")
# COLA runs on these; the plain ones through chain_type "lora"
COLA_ADAPTERS = ("lora", "qlora", *CHAIN_ADAPTERS)
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
PLAIN_LORA_DIR = "plain_lora"
# model types whose 4-bit/8-bit quantization axolotl sets up with settings of their own for lora/qlora (skipped
# modules, float32 storage: ModelLoader._set_quantization_config), which the plugin's quantization does not apply
QUANTIZED_SPECIALLY = ("jamba", "qwen2_moe", "nemotron_h", "falcon_h1", "nemotron_labs_diffusion_vlm")
# preference trainers whose loss has no reference model
REFERENCE_FREE_RL = ("orpo", "simpo")
# the frozen copy of the starting adapter that TRL's DPO, KTO and GRPO trainers make their reference when they are
# given a PeftModel (axolotl's GRPO runs; its DPO, IPO and KTO runs let TRL build the adapter and disable it)
TRL_REFERENCE_ADAPTER = "ref"


def uses_chain_adapter(cfg) -> bool:
    return cfg.get("adapter") in CHAIN_ADAPTERS


def uses_cola(cfg) -> bool:
    """Whether a YAML (raw or validated) asks for a chain of two links or more."""
    links = cfg.get("cola_links")
    return isinstance(links, int) and links > 1


def builds_adapter(cfg) -> bool:
    """This plugin builds the adapter of chain adapters and of every COLA run (plain LoRA as chain_type 'lora')."""
    return uses_chain_adapter(cfg) or uses_cola(cfg)


def kernels_on(cfg) -> list[str]:
    """The lora_*_kernel keys that are on and read the adapter (chain layers adapt no embeddings)."""
    return [key for key in LORA_KERNELS[:3] if cfg.get(key)]


def training_dtype(cfg) -> torch.dtype:
    """The dtype axolotl will load and train in, by axolotl's own resolve_dtype (which runs later, in
    normalize_config)."""
    precision = DictDefault({key: cfg.get(key) for key in ("bf16", "fp16", "bfloat16", "float16", "use_ray")})
    resolve_dtype(precision)
    return precision.torch_dtype


def rl_trainer(cfg) -> str | None:
    """The YAML's `rl:` trainer by name (a validated cfg holds axolotl's RLType)."""
    return getattr(cfg.get("rl"), "value", cfg.get("rl"))


def reference_is_the_base(cfg) -> bool:
    """Whether the trainer's reference model runs on the policy's own base weights: axolotl passes TRL no
    reference model for an adapter run (unless rl_adapter_ref_model loads one), so DPO, IPO, KTO and GRPO with a
    KL term compute the reference log-probs on the policy's base, with the adapter disabled or with a frozen copy
    of the adapter the run started from (TRL_REFERENCE_ADAPTER)."""
    rl = rl_trainer(cfg)
    if not rl or rl in REFERENCE_FREE_RL or cfg.get("rl_adapter_ref_model"):
        return False
    trl = cfg.get("trl") or {}
    beta = trl.get("beta") if isinstance(trl, dict) else getattr(trl, "beta", None)
    return not (rl in ("grpo", "ebft") and beta == 0)


def cola_merge(cfg) -> str:
    """Where COLA's finished links go, `cola_merge` with `auto` resolved where the YAML decides it: beside the base
    when the trainer's reference is the base (added into it, they would move the reference to the policy)."""
    # the raw YAML's key: the schedule's own checks run later, in the validators
    merge = cfg.get("cola_merge") or ColaSchedule.merge
    return "frozen" if merge == "auto" and reference_is_the_base(cfg) else merge


def cola_schedule(cfg) -> ColaSchedule:
    """The ColaSchedule a YAML (raw or validated) sets with its `cola_*` keys; unset keys keep its defaults."""
    settings = {field.name: cfg.get(f"cola_{field.name}") for field in dataclasses.fields(ColaSchedule)}
    settings["merge"] = cola_merge(cfg)
    return ColaSchedule(**{
        name: tuple(value) if isinstance(value, list) else value
        for name, value in settings.items()
        if value is not None
    })  # fmt: skip


def ties_into_base(cfg) -> bool:
    """Whether COLA will add the tied links into the base weights (ColaCallback decides the same at the start of
    training, from the loaded weights) rather than keep them beside the base."""
    merge = cola_merge(cfg)
    if merge != "auto":
        return merge == "base"
    quantized = cfg.get("load_in_4bit") or cfg.get("load_in_8bit")
    return not quantized and training_dtype(cfg) == torch.float32


def deepspeed_zero_stage(cfg) -> int | None:
    """The ZeRO stage of the `deepspeed:` config (a dict or a JSON file), None without one."""
    deepspeed = cfg.get("deepspeed")
    if isinstance(deepspeed, str) and Path(deepspeed).is_file():
        deepspeed = json.loads(Path(deepspeed).read_text())
    if isinstance(deepspeed, dict):
        return (deepspeed.get("zero_optimization") or {}).get("stage")
    return None


def lora_kernels_obstacle(cfg) -> str | None:
    """Why axolotl's LoRA kernels cannot compute this chain adapter or COLA run exactly; None when they can."""
    if cfg.get("load_in_8bit"):
        return "they do not run on 8-bit bases (load_in_8bit)"
    if deepspeed_zero_stage(cfg) == 3:
        return "under DeepSpeed ZeRO-3 they read the adapter tensors without calling the modules that gather them"
    if uses_cola(cfg) and cfg.get("lora_dropout") and not ties_into_base(cfg):
        return (
            "this COLA run keeps the tied links beside the base (cola_merge: frozen, or auto on a quantized or "
            "16-bit base), and the kernels would apply lora_dropout to their input too; set lora_dropout: 0"
        )
    return None


def settle_lora_kernels(cfg) -> None:
    """Set the lora_*_kernel keys a chain adapter or COLA YAML leaves unset: on where axolotl would turn them on
    for the same lora/qlora config, there is a CUDA device and the kernels compute the adapter exactly; else off,
    logged with the reason."""
    if any(cfg.get(key) is not None for key in LORA_KERNELS):
        return
    as_lora = {**cfg, "adapter": "qlora" if cfg.get("load_in_4bit") else "lora"}
    reason = lora_kernels_obstacle(cfg)
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device: they are Triton GPU kernels"
    if reason is None and not AxolotlConfigWCapabilities.check_auto_enable_lora_kernels(as_lora).get("lora_mlp_kernel"):
        reason = f"axolotl keeps them off for this config with adapter: {as_lora['adapter']}"
    for key in LORA_KERNELS:
        cfg[key] = reason is None
    if reason:
        LOG.info("adapter: %s: axolotl's LoRA kernels are off (%s)", cfg.get("adapter"), reason)


def chain_config_fields(cfg) -> dict[str, Any]:
    """The ChainLoraConfig fields a YAML (raw or validated) with a chain adapter sets."""
    adapter = cfg.get("adapter")
    fields: dict[str, Any] = {"chain_type": adapter if adapter != "mtlora" else f"mtlora_{cfg.get('mtlora_structure')}"}
    if cfg.get("chain_init") is not None:
        fields["chain_init"] = cfg.get("chain_init")
    if cfg.get("linchain_dims") is not None:
        fields["chain_dims"] = list(cfg.get("linchain_dims"))
    elif cfg.get("linchain_n") not in (None, DEFAULT_LINCHAIN_FACTORS):
        fields["chain_dims"] = [cfg.get("lora_r")] * (cfg.get("linchain_n") + 1)
    if cfg.get("mtlora_fused_splits"):
        fields["chain_fused_splits"] = dict(cfg.get("mtlora_fused_splits"))
    return fields


def refuse_what_axolotl_misnames(cfg) -> None:
    """Refusals axolotl makes with a message that misleads for chain adapters: a chain adapter's name in the wrong
    case ("not registered by a plugin"), and lora_fp32_gradients ("requires a LoRA adapter")."""
    adapter = cfg.get("adapter")
    if isinstance(adapter, str) and adapter not in CHAIN_ADAPTERS and adapter.lower() in CHAIN_ADAPTERS:
        raise ValueError(f"adapter: {adapter} is not an adapter name (they are lower case): set adapter: {adapter.lower()}.")
    if uses_chain_adapter(cfg) and cfg.get("lora_fp32_gradients"):
        raise ValueError(
            f"lora_fp32_gradients cannot be used with adapter: {adapter}: axolotl applies it to lora/qlora only. "
            "The chain adapters' weights train in float32 already (PEFT's autocast_adapter_dtype); remove "
            "lora_fp32_gradients."
        )


def kbit_preparation_skipped(cfg) -> str | None:
    """Why axolotl would not prepare this quantized base for k-bit training (ModelLoader._prepare_model_for_
    quantization: every shard must keep one dtype under FSDP with a 4-bit base or CPU-RAM-efficient loading,
    and under ZeRO-3); None where it would."""
    fsdp = cfg.fsdp_config is not None or cfg.fsdp is not None
    if fsdp and cfg.load_in_4bit:
        return "under FSDP"
    if fsdp and (cfg.fsdp_config or {}).get("cpu_ram_efficient_loading"):
        return "under FSDP with cpu_ram_efficient_loading"
    if is_deepspeed_zero3_enabled():
        return "under DeepSpeed ZeRO-3"
    return None


def cast_float8_adapter_weights(model, cfg) -> None:
    """Trainable adapter weights made float8 from an FP8 base's (peft_autocast_adapter_dtype: false) in the
    training dtype, as axolotl's load_lora casts them for lora/qlora: optimizers cannot step float8."""
    fallback = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float8_e4m3fn:
            param.data = param.data.to(cfg.torch_dtype or fallback)


def chain_yaml_keys(saved: dict) -> str:
    """The YAML keys that build the adapter of a saved chain adapter_config.json (chain_config_fields' inverse)."""
    chain_type = saved.get("chain_type")
    if chain_type == "lora":
        return "the cola_* keys of the COLA run that saved it (it holds tied links)"
    adapter, _, structure = str(chain_type).partition("_")
    keys = [f"adapter: {adapter}", f"lora_r: {saved.get('r')}"]
    if structure:
        keys.append(f"mtlora_structure: {structure}")
    if saved.get("chain_dims"):
        keys.append(f"linchain_dims: {saved['chain_dims']}")
    if saved.get("chain_fused_splits"):
        keys.append(f"mtlora_fused_splits: {saved['chain_fused_splits']}")
    return ", ".join(keys)


class ChainLoraPlugin(BasePlugin):
    """LinChain, MoSLoRA and MTLoRA adapters, and Chain of LoRA for any of them or plain LoRA, in axolotl.

    - LinChain: Wang, Zuo, Xuan, Li, Wei, "Linear Chain Transformation: Expanding Optimization Dynamics for
      Fine-Tuning Large Language Models", https://arxiv.org/abs/2411.00039;
    - MoSLoRA: Wu, Wang, Zhao, Wong, "Mixture-of-Subspaces in Low-Rank Adaptation",
      https://arxiv.org/abs/2406.11909;
    - MTLoRA: Liang, Wang, Li, Zeng, "Matrix-Transformation Based Low-Rank Adaptation",
      https://arxiv.org/abs/2403.07440;
    - COLA: Xia, Qin, Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning",
      https://arxiv.org/abs/2401.04151.

    `adapter: linchain | moslora | mtlora` trains delta_W = s * B T A (see `ChainLoraConfig`);
    `cola_links: M` ties M - 1 knots (see `ColaCallback`). The YAML keys are declared and validated in
    `axolotl_chainlora.args.ChainLoraArgs`. axolotl calls the hooks below; each does nothing for a
    config without a chain adapter or COLA.
    """

    def __init__(self):
        super().__init__()
        self._training_ended = False
        # the saved adapter file as it was when training ended (None: absent)
        self._adapter_file_at_train_end: tuple | None = None

    def register(self, cfg):
        # on the raw YAML, before axolotl's own validators, whose messages would mislead here
        refuse_what_axolotl_misnames(cfg)
        # any config's merge-lora may read a chain adapter (lora_model_dir, or output_dir by default)
        use_folding_merge()
        # axolotl turns its LoRA kernels on for lora/qlora before any plugin validator runs, unless the YAML
        # sets them: a COLA run on lora/qlora settles them here, on the raw YAML (the validator does the rest)
        if builds_adapter(cfg):
            settle_lora_kernels(cfg)

    def get_input_args(self) -> str:
        return "axolotl_chainlora.args.ChainLoraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # lora_like=False: if this plugin did not load the adapter, axolotl errors instead of loading stock LoRA
        return [AdapterCapabilities(name=name) for name in CHAIN_ADAPTERS]

    def pre_model_load(self, cfg):
        quantized = cfg.load_in_4bit or cfg.load_in_8bit
        if uses_chain_adapter(cfg) and quantized and cfg.model_config_type in QUANTIZED_SPECIALLY:
            raise ValueError(
                f"adapter: {cfg.adapter} cannot be trained on a quantized {cfg.model_config_type} base: axolotl "
                f"quantizes {cfg.model_config_type} models with settings of their own (modules left unquantized, "
                "storage dtype) that the plugin does not apply. Remove load_in_4bit/load_in_8bit, or use adapter: "
                "qlora (or lora)."
            )
        # before axolotl patches its kernels in (after the adapter loads)
        if builds_adapter(cfg) and kernels_on(cfg):
            use_chain_lora_parameters()
            LOG.info(
                "adapter: %s: axolotl's LoRA kernels (%s) compute it exactly", cfg.adapter, ", ".join(kernels_on(cfg))
            )

    def post_model_build(self, cfg, model):
        # what axolotl's loader does for lora/qlora bases only (ModelLoader._apply_post_model_load_setup)
        if not uses_chain_adapter(cfg):
            return
        if cfg.gradient_checkpointing:
            # activation_offloading turns the Trainer's checkpointing off: axolotl turns it on for lora/qlora here
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs)
        if not (cfg.load_in_4bit or cfg.load_in_8bit):
            return
        _require_quantized_base(cfg, model)
        skipped = kbit_preparation_skipped(cfg)
        if skipped:
            LOG.info("adapter: %s: prepare_model_for_kbit_training skipped, as axolotl does for qlora %s", cfg.adapter,
                     skipped)  # fmt: skip
            return
        # norms in float32, input grads for checkpointing; looked up now, so that axolotl's patched version (which
        # leaves the embeddings' dtype alone) runs where axolotl installed it
        peft_other.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if not builds_adapter(cfg):
            return None
        # axolotl's own LoraConfig (targets, lora_target_linear, patterns, dropout...) plus the core
        _, lora_config = load_lora(model, cfg, config_only=True)
        config = _chain_config(cfg, lora_config)
        if config_only:
            return None, config
        peft_kwargs = {}
        if cfg.peft_autocast_adapter_dtype is not None:
            peft_kwargs["autocast_adapter_dtype"] = cfg.peft_autocast_adapter_dtype
        if cfg.lora_model_dir:
            require_same_chain(cfg, PeftConfig.from_pretrained(cfg.lora_model_dir))
            if cfg.lora_on_cpu:  # as axolotl's load_lora
                peft_kwargs.update(max_memory={"cpu": "256GiB"}, device_map={"": "cpu"})
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference, **peft_kwargs)
        else:
            if cfg.seed is not None:
                set_seed(cfg.seed)
            model = get_peft_model(model, config, **peft_kwargs)
        cast_float8_adapter_weights(model, cfg)
        model.print_trainable_parameters()
        return model, config

    def post_lora_load(self, cfg, model):
        # axolotl builds lora/qlora adapters itself without asking plugins: a COLA run puts the same LoRA
        # back as chain layers (chain_type 'lora'), which hold the tied links
        if uses_chain_adapter(cfg) or not uses_cola(cfg) or isinstance(model.peft_config["default"], ChainLoraConfig):
            return  # (a COLA adapter from lora_model_dir loads as chain layers already)
        tuner = model.base_model
        config = _chain_config(cfg, tuner.peft_config["default"])
        tuner.unload()
        tuner.peft_config["default"] = config
        if cfg.seed is not None:
            # the new layers draw A afresh: from the seed, as load_adapter does, not from whatever ran before
            set_seed(cfg.seed)
        tuner.inject_adapter(
            tuner.model, "default", autocast_adapter_dtype=cfg.peft_autocast_adapter_dtype is not False
        )
        # unload() took it off the model, as BaseTuner.__init__ puts it there (axolotl's kernel patcher reads it)
        tuner.model.peft_config = tuner.peft_config
        tuner.set_adapter("default")
        LOG.info("adapter: %s with COLA: LoRA layers rebuilt as chain layers (chain_type 'lora')", cfg.adapter)
        model.print_trainable_parameters()

    def post_model_load(self, cfg, model):
        # axolotl's kernels are patched in by now: without the chain-aware lookup they would train plain LoRA
        if builds_adapter(cfg) and kernels_on(cfg) and not kernels_read_chain_adapters():
            raise RuntimeError(
                "axolotl's LoRA kernels are on but read the adapter through another get_lora_parameters than "
                "axolotl_chainlora's: they would train plain LoRA. Another integration replaced it; set the "
                "lora_*_kernel keys to false."
            )

    def post_trainer_create(self, cfg, trainer):
        if builds_adapter(cfg) and TRL_REFERENCE_ADAPTER in getattr(trainer.model, "peft_config", {}):
            layers = copy_tied_links(trainer.model, "default", TRL_REFERENCE_ADAPTER)
            if layers:
                LOG.info("TRL's reference adapter, a copy of the policy's, got its tied links (%d layers)", layers)

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        callbacks = []
        if uses_cola(cfg):
            callbacks.append(ColaCallback(cola_schedule(cfg), trainer))
        if builds_adapter(cfg) and cfg.chain_export_lora:
            callbacks.append(_RecordTrainingEnd(self))
        return callbacks

    def post_train(self, cfg, model):
        # axolotl calls this right after training and again once the final adapter is saved:
        # fold when the adapter file has been written since training ended
        if not (builds_adapter(cfg) and cfg.chain_export_lora and self._training_ended):
            return
        adapter_weights = Path(cfg.output_dir) / ADAPTER_WEIGHTS
        if not adapter_weights.is_file() or _file_version(adapter_weights) == self._adapter_file_at_train_end:
            return
        self._training_ended = False
        if int(os.environ.get("RANK", "0")) != 0:
            return
        out_dir = Path(cfg.output_dir) / PLAIN_LORA_DIR
        shutil.rmtree(out_dir, ignore_errors=True)  # a previous run's export of this output_dir
        fold_to_lora(cfg.output_dir, out_dir)
        LOG.info("adapter: %s folded into a plain LoRA at %s", cfg.adapter, out_dir)


class _RecordTrainingEnd(TrainerCallback):
    def __init__(self, plugin: ChainLoraPlugin):
        self.plugin = plugin

    def on_train_end(self, args, state, control, **kwargs):
        adapter_weights = Path(args.output_dir) / ADAPTER_WEIGHTS
        self.plugin._adapter_file_at_train_end = _file_version(adapter_weights) if adapter_weights.is_file() else None
        self.plugin._training_ended = True


def _file_version(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _require_quantized_base(cfg, model) -> None:
    """Fail rather than train a chain adapter on an unquantized base the user asked to quantize."""
    wanted = bnb.nn.Linear4bit if cfg.load_in_4bit else bnb.nn.Linear8bitLt
    if not any(isinstance(module, wanted) for module in model.modules()):
        raise RuntimeError(
            f"load_in_{'4' if cfg.load_in_4bit else '8'}bit is set but the base model loaded without "
            f"{wanted.__name__} layers: the quantization config did not reach the model loader."
        )


def _chain_config(cfg, lora_config) -> ChainLoraConfig:
    """axolotl's LoraConfig plus the core (chain_type 'lora', none, for a COLA run on plain LoRA)."""
    fields = chain_config_fields(cfg) if uses_chain_adapter(cfg) else {"chain_type": "lora"}
    if uses_cola(cfg) and not cfg.lora_model_dir:
        fields.update(_links_of_resumed_checkpoint(cfg))
    return ChainLoraConfig.from_lora_config(lora_config, **fields)


def _links_of_resumed_checkpoint(cfg) -> dict:
    """The tied links of the COLA checkpoint this run will resume from, so that the adapter is built in its shape
    before the trainer loads it (axolotl picks the checkpoint only after building the model). The link keeps the
    first link's rank: a lower-rank link loads zero-padded into it, as training held it."""
    # axolotl's own choice (resume_from_checkpoint, else the last checkpoint with auto_resume), made now
    checkpoint = determine_last_checkpoint(cfg)
    saved_config = Path(checkpoint or "") / "adapter_config.json"
    if not checkpoint or not saved_config.is_file():
        return {}
    saved = json.loads(saved_config.read_text())
    return {"cola_tied_ranks": saved.get("cola_tied_ranks")}


def require_same_chain(cfg, saved: PeftConfig) -> None:
    """lora_model_dir must hold the adapter this YAML describes, not plain LoRA or another core: checked at
    validation for a local folder (args.py), and again when the adapter loads (a hub id is first read there)."""
    if not isinstance(saved, ChainLoraConfig):
        raise ValueError(
            f"lora_model_dir={cfg.get('lora_model_dir')} holds a {type(saved).__name__} adapter, not adapter: "
            f"{cfg.get('adapter')}: point lora_model_dir at a chain adapter or change adapter."
        )
    # the YAML's keys as axolotl's load_lora and _chain_config map them
    fields = chain_config_fields(cfg) if uses_chain_adapter(cfg) else {"chain_type": "lora"}
    config = ChainLoraConfig(
        r=cfg.get("lora_r"), lora_alpha=cfg.get("lora_alpha"), use_rslora=bool(cfg.get("peft_use_rslora")), **fields
    )
    # a COLA run's last link has the last of cola_ranks
    compared = ("lora_alpha", "use_rslora", "chain_type", "chain_dims", "chain_fused_splits")
    for field in compared if uses_cola(cfg) else ("r", *compared):
        saved_value, wanted = _chain_setting(saved, field), _chain_setting(config, field)
        if saved_value != wanted:
            raise ValueError(
                f"lora_model_dir={cfg.get('lora_model_dir')} was saved with {field}={saved_value!r} but this config "
                f"asks for {wanted!r}: make the YAML match the saved adapter."
            )


def _chain_setting(config: ChainLoraConfig, field: str):
    if field == "chain_dims" and config.chain_type == "linchain":
        return config.chain_dims or default_chain_dims(config.r)
    return getattr(config, field) or None
