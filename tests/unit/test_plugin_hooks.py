"""The plugin's hooks: inert for configs without a chain adapter (axolotl 0.21 loads the plugin for every
config), and loud when a quantized base did not come out quantized."""

from __future__ import annotations

import copy

import pytest
from axolotl.utils.dict import DictDefault
from helpers import tiny_llama

from axolotl_chainlora import ChainLoraPlugin


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
