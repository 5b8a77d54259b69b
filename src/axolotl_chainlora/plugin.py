"""The axolotl plugin: `adapter: linchain | moslora | mtlora` in an ordinary axolotl YAML.

Thin on purpose: it turns the YAML into a ChainLoraConfig and closes the gaps axolotl
leaves for plugin adapters (DESIGN.md section 3). axolotl >= 0.21 loads it for every
config through the `axolotl.plugins` entry point, so every hook does nothing unless
the config uses a chain adapter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from peft import PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback, set_seed

from .args import CHAIN_ADAPTERS, LOG, chain_config_fields
from .config import ChainLoraConfig
from .cores import default_chain_dims
from .export import ADAPTER_WEIGHTS, fold_to_lora

PLAIN_LORA_DIR = "plain_lora"


def uses_chain_adapter(cfg) -> bool:
    return cfg.adapter in CHAIN_ADAPTERS


class ChainLoraPlugin(BasePlugin):
    """LinChain, MoSLoRA and MTLoRA adapters for axolotl."""

    def __init__(self):
        super().__init__()
        self._training_ended = False
        # the saved adapter file as it was when training ended (None: absent)
        self._adapter_file_at_train_end: tuple | None = None

    def get_input_args(self) -> str:
        return "axolotl_chainlora.args.ChainLoraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # lora_like=False: if this plugin did not load the adapter, axolotl errors instead of loading stock LoRA
        return [AdapterCapabilities(name=name) for name in CHAIN_ADAPTERS]

    def post_model_build(self, cfg, model):
        if not uses_chain_adapter(cfg) or not (cfg.load_in_4bit or cfg.load_in_8bit):
            return
        _require_quantized_base(cfg, model)
        # what axolotl's qlora path does (norms in float32, input grads for checkpointing)
        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if not uses_chain_adapter(cfg):
            return None
        from axolotl.loaders.adapter import load_lora

        # axolotl's own LoraConfig (targets, lora_target_linear, patterns, dropout...) plus the core
        _, lora_config = load_lora(model, cfg, config_only=True)
        config = ChainLoraConfig.from_lora_config(lora_config, **chain_config_fields(cfg))
        if config_only:
            return None, config
        peft_kwargs = {}
        if cfg.peft_autocast_adapter_dtype is not None:
            peft_kwargs["autocast_adapter_dtype"] = cfg.peft_autocast_adapter_dtype
        if cfg.lora_model_dir:
            _require_same_chain(cfg, config, PeftConfig.from_pretrained(cfg.lora_model_dir))
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference, **peft_kwargs)
        else:
            if cfg.seed is not None:
                set_seed(cfg.seed)
            model = get_peft_model(model, config, **peft_kwargs)
        model.print_trainable_parameters()
        return model, config

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if not (uses_chain_adapter(cfg) and cfg.chain_export_lora):
            return []
        return [_RecordTrainingEnd(self)]

    def post_train(self, cfg, model):
        # axolotl calls this right after training and again once the final adapter is saved:
        # fold when the adapter file has been written since training ended
        if not (uses_chain_adapter(cfg) and cfg.chain_export_lora and self._training_ended):
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
    import bitsandbytes as bnb

    wanted = bnb.nn.Linear4bit if cfg.load_in_4bit else bnb.nn.Linear8bitLt
    if not any(isinstance(module, wanted) for module in model.modules()):
        raise RuntimeError(
            f"load_in_{'4' if cfg.load_in_4bit else '8'}bit is set but the base model loaded without "
            f"{wanted.__name__} layers: the quantization config did not reach the model loader."
        )


def _require_same_chain(cfg, config: ChainLoraConfig, saved) -> None:
    """lora_model_dir must hold the adapter this YAML describes, not plain LoRA or another core."""
    if not isinstance(saved, ChainLoraConfig):
        raise ValueError(
            f"lora_model_dir={cfg.lora_model_dir} holds a {type(saved).__name__} adapter, not adapter: "
            f"{cfg.adapter}: point lora_model_dir at a chain adapter or change adapter."
        )
    for field in ("r", "lora_alpha", "use_rslora", "chain_type", "chain_dims", "chain_fused_splits"):
        saved_value, wanted = _chain_setting(saved, field), _chain_setting(config, field)
        if saved_value != wanted:
            raise ValueError(
                f"lora_model_dir={cfg.lora_model_dir} was saved with {field}={saved_value!r} but this config "
                f"asks for {wanted!r}: make the YAML match the saved adapter."
            )


def _chain_setting(config: ChainLoraConfig, field: str):
    if field == "chain_dims" and config.chain_type == "linchain":
        return config.chain_dims or default_chain_dims(config.r)
    return getattr(config, field) or None
