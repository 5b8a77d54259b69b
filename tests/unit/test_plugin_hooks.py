"""The plugin's hooks: inert for configs without a chain adapter (axolotl 0.21 loads the plugin for every
config), loud when a quantized base did not come out quantized, and in charge of what axolotl's LoRA kernels
read."""

from __future__ import annotations

import copy
import sys
import types

import axolotl.kernels.lora as axolotl_lora
import bitsandbytes as bnb
import peft.utils.other as peft_other
import pytest
import torch
from axolotl.utils.dict import DictDefault
from helpers import ALPHA, TARGETS, R, tiny_llama
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import Trainer, TrainerCallback, TrainingArguments

import axolotl_chainlora.plugin as plugin_module
from axolotl_chainlora import ChainLoraConfig, ChainLoraPlugin
from axolotl_chainlora.kernels import axolotl_lora_parameters, chain_lora_parameters
from axolotl_chainlora.plugin import cast_float8_adapter_weights


@pytest.mark.parametrize("adapter", [None, "lora", "qlora"])
def test_hooks_do_nothing_without_a_chain_adapter(adapter):
    plugin = ChainLoraPlugin()
    cfg = DictDefault(adapter=adapter, load_in_4bit=adapter == "qlora", chain_export_lora=None, output_dir="unused")
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    plugin.post_model_build(cfg, model)
    assert plugin.load_adapter(model, cfg) is None
    assert plugin.add_callbacks_post_trainer(cfg, trainer=None) == []
    plugin.post_train(cfg, model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert all(param.requires_grad for param in model.parameters())  # no k-bit preparation ran


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_an_unquantized_base_is_refused_when_quantization_was_asked_for(bits):
    cfg = DictDefault(adapter="linchain", gradient_checkpointing=False, **{bits: True})
    with pytest.raises(RuntimeError, match=rf"{bits} is set but the base model loaded without Linear"):
        ChainLoraPlugin().post_model_build(cfg, tiny_llama())


@pytest.fixture
def axolotl_lookup(monkeypatch):
    """axolotl's get_lora_parameters, put back after the test."""
    monkeypatch.setattr(axolotl_lora, "get_lora_parameters", axolotl_lora_parameters)


@pytest.mark.parametrize(
    ("cfg", "chain_aware"),
    [
        pytest.param({"adapter": "linchain", "lora_qkv_kernel": True}, True, id="chain-adapter"),
        pytest.param({"adapter": "lora", "cola_links": 2, "lora_mlp_kernel": True}, True, id="cola-on-lora"),
        pytest.param({"adapter": "linchain", "lora_embedding_kernel": True}, False, id="no-projection-kernel"),
        pytest.param({"adapter": "lora", "lora_mlp_kernel": True}, False, id="plain-lora"),
    ],
)
def test_kernels_read_chain_adapters_once_the_model_loads(axolotl_lookup, cfg, chain_aware):
    ChainLoraPlugin().pre_model_load(DictDefault(cfg))
    assert (axolotl_lora.get_lora_parameters is chain_lora_parameters) is chain_aware


def test_kernels_reading_plain_lora_stop_the_run(axolotl_lookup):
    # negative control: the kernels on, axolotl's own lookup in place (another integration replaced ours)
    cfg = DictDefault(adapter="moslora", lora_o_kernel=True)
    with pytest.raises(RuntimeError, match="they would train plain LoRA"):
        ChainLoraPlugin().post_model_load(cfg, model=None)
    ChainLoraPlugin().pre_model_load(cfg)
    ChainLoraPlugin().post_model_load(cfg, model=None)


def test_integrations_that_bound_axolotls_lookup_read_chain_adapters_too(axolotl_lookup, monkeypatch):
    # as axolotl's DeepSeek-V4 kernels do: `from axolotl.kernels.lora import get_lora_parameters`
    integration = types.ModuleType("axolotl.integrations.bound_lookup")
    integration.get_lora_parameters = axolotl_lora_parameters
    monkeypatch.setitem(sys.modules, integration.__name__, integration)
    ChainLoraPlugin().pre_model_load(DictDefault(adapter="mtlora", lora_mlp_kernel=True))
    assert integration.get_lora_parameters is chain_lora_parameters
    integration.get_lora_parameters = axolotl_lora_parameters  # negative control: put back by someone else
    with pytest.raises(RuntimeError, match="they would train plain LoRA"):
        ChainLoraPlugin().post_model_load(DictDefault(adapter="mtlora", lora_mlp_kernel=True), model=None)


def first_link_after_cola_rebuild(seed: int | None, rng_state: int) -> dict[str, torch.Tensor]:
    """A COLA run's LoRA rebuilt as chain layers by post_lora_load, after code that drew rng_state's numbers."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    torch.manual_seed(rng_state)
    cfg = DictDefault(adapter="lora", cola_links=2, seed=seed, output_dir="unused")
    ChainLoraPlugin().post_lora_load(cfg, model)
    assert isinstance(model.peft_config["default"], ChainLoraConfig)
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}


def test_cola_rebuild_draws_the_first_link_from_the_seed():
    first, second = first_link_after_cola_rebuild(7, rng_state=0), first_link_after_cola_rebuild(7, rng_state=1)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    # negative control: without a seed the draw follows whatever ran before
    unseeded, unseeded_again = first_link_after_cola_rebuild(None, 0), first_link_after_cola_rebuild(None, 1)
    assert not any(torch.equal(unseeded[name], unseeded_again[name]) for name in unseeded)


# ---------------------------------------------------------------- what axolotl's loader does for lora/qlora only


@pytest.mark.parametrize(("adapter", "checkpointing"), [("linchain", True), ("linchain", False), ("lora", True)])
def test_a_chain_adapter_gets_gradient_checkpointing_at_load_as_lora_does(adapter, checkpointing):
    """axolotl turns checkpointing on at load for lora/qlora (activation_offloading turns the Trainer's off); for lora
    it does so itself, so the plugin leaves it alone."""
    model = tiny_llama()
    cfg = DictDefault(adapter=adapter, gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=None)
    ChainLoraPlugin().post_model_build(cfg, model)
    assert model.is_gradient_checkpointing is (adapter == "linchain" and checkpointing)


@pytest.fixture
def kbit_preparations(monkeypatch) -> list:
    """The calls of peft's prepare_model_for_kbit_training, by the name axolotl's patched version replaces."""
    calls = []
    monkeypatch.setattr(peft_other, "prepare_model_for_kbit_training", lambda model, **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize(
    ("settings", "prepared"),
    [
        pytest.param({"load_in_4bit": True}, True, id="4bit"),
        pytest.param({"load_in_4bit": True, "fsdp_config": {"fsdp_version": 2}}, False, id="4bit-fsdp"),
        pytest.param({"load_in_8bit": True, "fsdp_config": {"fsdp_version": 2}}, True, id="8bit-fsdp"),
        pytest.param({"load_in_8bit": True, "fsdp_config": {"cpu_ram_efficient_loading": True}}, False,
                     id="8bit-fsdp-cpu-ram-efficient"),  # fmt: skip
        pytest.param({"load_in_4bit": True, "zero3": True}, False, id="4bit-zero3"),
    ],
)
def test_kbit_preparation_runs_where_axolotl_runs_it_for_qlora(kbit_preparations, monkeypatch, settings, prepared):
    settings = dict(settings)
    monkeypatch.setattr(plugin_module, "is_deepspeed_zero3_enabled", lambda: settings.pop("zero3", False))
    model = tiny_llama()
    model.add_module("quantized", bnb.nn.Linear4bit(8, 8) if settings.get("load_in_4bit") else bnb.nn.Linear8bitLt(8, 8))
    cfg = DictDefault(adapter="moslora", gradient_checkpointing=True, gradient_checkpointing_kwargs=None, **settings)
    ChainLoraPlugin().post_model_build(cfg, model)
    assert kbit_preparations == ([{"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": None}]
                                 if prepared else [])  # fmt: skip


def test_float8_adapter_weights_train_in_the_training_dtype():
    """As axolotl's load_lora does for lora/qlora on an FP8 base with peft_autocast_adapter_dtype: false."""
    model = get_peft_model(tiny_llama(), ChainLoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         chain_type="moslora"))  # fmt: skip
    model.base_model.model.lm_head.weight.data = model.base_model.model.lm_head.weight.data.to(torch.float8_e4m3fn)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float8_e4m3fn)
    cast_float8_adapter_weights(model, DictDefault(torch_dtype=torch.bfloat16))
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert {dtypes[name] for name, param in model.named_parameters() if param.requires_grad} == {torch.bfloat16}
    assert any(".lora_core." in name for name, param in model.named_parameters() if param.requires_grad)
    assert dtypes["base_model.model.lm_head.weight"] == torch.float8_e4m3fn  # frozen weights stay as they are


@pytest.mark.parametrize("model_type", ["jamba", "falcon_h1", "llama"])
@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_a_quantized_base_axolotl_quantizes_specially_is_refused_before_it_loads(model_type, bits):
    cfg = DictDefault(adapter="linchain", model_config_type=model_type, **{bits: True})
    if model_type == "llama":
        ChainLoraPlugin().pre_model_load(cfg)
        return
    with pytest.raises(ValueError, match=rf"adapter: linchain cannot be trained on a quantized {model_type} base"):
        ChainLoraPlugin().pre_model_load(cfg)
    ChainLoraPlugin().pre_model_load(DictDefault(adapter="linchain", model_config_type=model_type))  # unquantized


# ---------------------------------------------------------------- LoRA+ (loraplus_lr_ratio)


@pytest.mark.parametrize("chain_type", ["linchain", "moslora", "mtlora_dtsm"])
@pytest.mark.parametrize("path", ["peft", "axolotl"])
def test_loraplus_scales_b_alone_and_keeps_the_cores_at_the_base_lr(chain_type, path):
    """The groups axolotl's LoRA+ paths give a chain adapter: PEFT's create_loraplus_optimizer (axolotl's default) and
    axolotl's apply_loraplus_lr_groups (0.21, with embedding_lr): B at lr * ratio; A and every core factor at lr. The
    cores stay with A on purpose: LoRA+ scales B because B's fan-in is the rank while its output is the model's width;
    an r x r core has no width dimension (docs/methods.md)."""
    model = get_peft_model(tiny_llama(), ChainLoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         chain_type=chain_type))  # fmt: skip
    lr, ratio = 1e-3, 16.0
    if path == "peft":
        groups = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio).param_groups
    else:
        loraplus = pytest.importorskip("axolotl.utils.optimizers.loraplus", reason="axolotl 0.21's own LoRA+ groups")
        trainable = [{"params": [param for param in model.parameters() if param.requires_grad], "lr": lr}]
        groups = loraplus.apply_loraplus_lr_groups(trainable, model.named_parameters(), default_lr=lr,
                                                   loraplus_lr_ratio=ratio, eligible=lambda *_: True)  # fmt: skip
    names = {id(param): name for name, param in model.named_parameters()}
    lrs = {names[id(param)]: group["lr"] for group in groups for param in group["params"]}
    assert any(".lora_core." in name for name in lrs)
    for name, value in lrs.items():
        assert value == (lr * ratio if ".lora_B." in name else lr), name


# ---------------------------------------------------------------- NEFTune (neftune_noise_alpha)


def test_neftune_noises_a_chain_models_embeddings_in_training_only(tmp_path):
    """axolotl passes neftune_noise_alpha to transformers' Trainer, which hooks the input embeddings it finds through
    the PeftModel: noisy in training, clean in evaluation, the hook gone after training."""
    model = get_peft_model(tiny_llama(), ChainLoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         chain_type="linchain"))  # fmt: skip
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4]])
    seen = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            was_training = embeddings.training
            with torch.no_grad():
                embeddings.train()
                seen["training"] = not torch.equal(embeddings(ids), embeddings.weight[ids])
                embeddings.eval()
                seen["evaluation"] = torch.equal(embeddings(ids), embeddings.weight[ids])
            embeddings.train(was_training)

    rows = [{"input_ids": list(range(8)), "labels": list(range(8))}] * 2
    args = TrainingArguments(output_dir=str(tmp_path), neftune_noise_alpha=5.0, max_steps=1, report_to=[],
                             use_cpu=True, per_device_train_batch_size=2)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Probe()]).train()
    assert seen == {"training": True, "evaluation": True}
    embeddings.train()
    assert torch.equal(embeddings(ids), embeddings.weight[ids])  # the hook is gone after training
