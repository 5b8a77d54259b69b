"""Bad input and unsupported combinations fail with an error that names the key and the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import offline_env, randomize_adapters, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from axolotl_chainlora import ChainLoraConfig, check_peft_version

BASE = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(chain_type="lochain"), "chain_type='lochain' is not supported: use one of lora, moslora"),
        (dict(), "chain_type=None is not supported"),
        (dict(chain_type="moslora", chain_init="zeros"), "chain_init='zeros' is not supported"),
        (dict(chain_type="linchain", chain_dims=[4, 8, 5]), r"must start and end with r=4"),
        (dict(chain_type="linchain", chain_dims=[8, 8]), r"must start and end with r=4"),
        (dict(chain_type="linchain", chain_dims=[4, 0, 4]), "list of at least two positive integers"),
        (dict(chain_type="linchain", chain_dims=[4, -2, 4]), "list of at least two positive integers"),
        (dict(chain_type="linchain", chain_dims=[4]), "list of at least two positive integers"),
        (dict(chain_type="moslora", chain_dims=[4, 4]), "chain_dims is for chain_type='linchain' only"),
        (
            dict(chain_type="linchain", chain_dims=[4, 4], rank_pattern={"v_proj": 2}),
            "cannot be combined with rank_pattern",
        ),
        (dict(chain_type="linchain", chain_fused_splits={"c_attn": 3}), "chain_fused_splits is for the mtlora_"),
        (dict(chain_type="mtlora_shim", chain_fused_splits={"c_attn": 1}), r"chain_fused_splits\['c_attn'\]=1"),
        (dict(chain_type="mtlora_shim", chain_fused_splits={"c_attn": [4, 0]}), "list of positive slice sizes"),
        (
            dict(chain_type="mtlora_shim", chain_fused_splits={"c_attn": 3}, lora_bias=True),
            "lora_bias=True is not supported",
        ),
        (dict(chain_type="moslora", chain_format_version=2), "chain_format_version=2"),
    ],
)
def test_bad_chain_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChainLoraConfig(**BASE, **kwargs)


@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "eva", "orthogonal", "mica"]
)
def test_inits_that_assume_no_core_are_refused(init):
    extra = {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*use one of"):
        ChainLoraConfig(**BASE, chain_type="moslora", init_lora_weights=init, **extra)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(use_dora=True), "use_dora"),
        (dict(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"),
        (dict(use_bdlora={"target_modules_bd_a": ["q_proj"]}), "use_bdlora"),
    ],
)
def test_other_lora_variants_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=f"{field} is another LoRA variant.*remove {field}"):
        ChainLoraConfig(**BASE, chain_type="linchain", **kwargs)


def test_target_parameters_are_refused():
    with pytest.raises(ValueError, match="target_parameters"):
        ChainLoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["gate_up_proj"], chain_type="moslora")


def test_unsupported_target_type_names_module_and_type():
    config = ChainLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], chain_type="moslora")
    with pytest.raises(
        TypeError, match=r"'model.embed_tokens' of type torch.nn.modules.sparse.Embedding.*exclude_modules"
    ):
        get_peft_model(tiny_llama(), config)


def test_fan_in_fan_out_must_fit_the_layer_type():
    config = ChainLoraConfig(**BASE, chain_type="moslora", fan_in_fan_out=True)
    with pytest.raises(
        ValueError, match=r"fan_in_fan_out=True does not fit module .* of type Linear: set fan_in_fan_out=False"
    ):
        get_peft_model(tiny_llama(), config)


def test_fused_split_that_does_not_fit_the_layer():
    config = ChainLoraConfig(**BASE, chain_type="mtlora_ctcm", chain_fused_splits={"q_proj": 5})
    with pytest.raises(
        ValueError, match=r"module 'model.layers.0.self_attn.q_proj' has 32 outputs, not divisible into 5"
    ):
        get_peft_model(tiny_llama(), config)
    config = ChainLoraConfig(**BASE, chain_type="mtlora_ctcm", chain_fused_splits={"q_proj": [16, 8]})
    with pytest.raises(ValueError, match=r"sums to 24, but module 'model.layers.0.self_attn.q_proj' has 32 outputs"):
        get_peft_model(tiny_llama(), config)


def test_a_stock_peft_layer_refuses_a_chain_config():
    # the safety net behind the custom layers: PEFT's own Linear must not quietly train plain LoRA
    config = ChainLoraConfig(**BASE, chain_type="moslora")
    with pytest.raises(ValueError, match="unsupported variant combination"):
        PeftLoraLinear(torch.nn.Linear(8, 8), "default", config=config, r=4, lora_alpha=8)


def test_add_weighted_adapter_is_refused():
    model = get_peft_model(tiny_llama(), ChainLoraConfig(**BASE, chain_type="moslora"))
    model.add_adapter("second", ChainLoraConfig(**BASE, chain_type="moslora"))
    with pytest.raises(
        ValueError, match=r"add_weighted_adapter cannot combine chain adapters \['default', 'second'\].*fold_to_lora"
    ):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="svd")
    assert "mix" not in model.peft_config


def test_add_weighted_adapter_still_works_for_plain_lora():
    model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
    model.add_adapter("second", LoraConfig(**BASE))
    model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" in model.peft_config


@pytest.fixture
def saved_adapter(tiny_llama_dir, tmp_path):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ChainLoraConfig(**BASE, chain_type="mtlora_ctcm")
    )
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def rewrite_tensors(adapter_dir, change):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_adapter_file_missing_a_core_tensor_is_refused(saved_adapter, tiny_llama_dir):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_core.weight_1"
    rewrite_tensors(saved_adapter, lambda tensors: tensors.pop(key))
    with pytest.raises(
        ValueError, match=r"module '.*layers.1.self_attn.v_proj'.*missing \['lora_core.default.weight_1'\]"
    ):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), saved_adapter)


def test_adapter_file_with_an_extra_tensor_is_refused(saved_adapter, tiny_llama_dir):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_core.weight_2"
    rewrite_tensors(saved_adapter, lambda tensors: tensors.__setitem__(key, torch.zeros(4, 4)))
    with pytest.raises(
        ValueError,
        match=r"module '.*layers.0.self_attn.q_proj'.*missing \[\], unexpected \['lora_core\.(default\.)?weight_2'\]",
    ):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), saved_adapter)


def test_adapter_of_another_format_version_is_refused(saved_adapter, tiny_llama_dir):
    config_path = saved_adapter / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["chain_format_version"] = 99
    config_path.write_text(json.dumps(saved))
    with pytest.raises(
        ValueError, match="chain_format_version=99.*Install the axolotl-chainlora release that wrote it"
    ):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), saved_adapter)


@pytest.mark.parametrize("version", ["0.19.1", "0.22.0", "1.0.0"])
def test_untested_peft_version_is_refused(version):
    with pytest.raises(ImportError, match=rf"peft {version} is installed.*pip install 'peft"):
        check_peft_version(version)


def test_import_fails_with_an_untested_peft():
    code = "import peft; peft.__version__ = '0.30.0'; import axolotl_chainlora"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(), timeout=300
    )
    assert result.returncode != 0
    assert "ImportError: axolotl-chainlora" in result.stderr and "peft 0.30.0 is installed" in result.stderr
