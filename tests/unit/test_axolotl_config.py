"""The chain adapters' YAML keys through axolotl's own config loading, in process.

Every YAML here goes through `axolotl.cli.config.load_cfg`, the function every axolotl
command starts with: plugin discovery (the `axolotl.plugins` entry point, `plugins:`),
the plugin-extended pydantic schema (`validate_config`), then `normalize_config`. A bad
YAML must fail there, before any model is loaded, with a pydantic ValidationError that
names the key and the fix; a good one must validate to what the user meant.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re

import pytest
import yaml

pytest.importorskip("axolotl", reason="the axolotl extra is not installed")

import axolotl.cli.merge_lora as axolotl_merge_cli
import torch
from axolotl.cli.config import gpu_capabilities, load_cfg
from axolotl.integrations import base as axolotl_plugins
from axolotl.integrations.base import PluginManager
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
from axolotl.utils.tee import close_debug_log
from helpers import PLUGIN, chain_config, tiny_llama
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from transformers import BitsAndBytesConfig

from axolotl_chainlora import ChainLoraConfig
from axolotl_chainlora.args import ChainLoraArgs
from axolotl_chainlora.log import LOG
from axolotl_chainlora.merge import EFFICIENT_MERGE_MATCHES_4BIT_TRAINING, axolotl_efficient_merge, merge_folded
from axolotl_chainlora.plugin import ChainLoraPlugin, chain_config_fields, cola_schedule, ties_into_base

# axolotl 0.21 loads entry-point plugins for every config; 0.19 only what `plugins:` lists
FINDS_ENTRY_POINTS = hasattr(axolotl_plugins, "get_builtin_plugins")
requires_entry_points = pytest.mark.skipif(
    not FINDS_ENTRY_POINTS, reason="this axolotl finds plugins only through the `plugins:` line"
)
R = 8  # lora_r of the demo config
KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
DROP = object()  # an override that removes the key from the YAML
# the three chain adapters, each with the keys it needs
ADAPTERS = {
    "linchain": {"adapter": "linchain"},
    "moslora": {"adapter": "moslora"},
    "mtlora": {"adapter": "mtlora", "mtlora_structure": "icfm"},
}


# ---------------------------------------------------------------- fixtures and helpers


class Records(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged(level: int):
    """The package's log lines at `level` and above, while the block runs."""
    records = Records(level)
    saved_level = LOG.level
    LOG.addHandler(records)
    LOG.setLevel(min(level, LOG.getEffectiveLevel()))
    try:
        yield records.messages
    finally:
        LOG.removeHandler(records)
        LOG.setLevel(saved_level)


@pytest.fixture(scope="module")
def base_yaml(demo_dir) -> dict:
    """The demo YAML (adapter: linchain, lora_r: 8) with absolute paths and only axolotl keys
    plus `adapter`: no `plugins:` line where axolotl finds the plugin by its entry point."""
    data = yaml.safe_load((demo_dir / "config.yml").read_text())
    if FINDS_ENTRY_POINTS:
        data.pop("plugins")
    data.pop("chain_export_lora")
    data["base_model"] = str(demo_dir / "base")
    data["datasets"][0]["path"] = str(demo_dir / "data.jsonl")
    assert data["adapter"] == "linchain" and data["lora_r"] == R and data["bf16"] is False
    return data


@pytest.fixture(autouse=True)
def isolated_axolotl(monkeypatch):
    """A fresh PluginManager singleton per test, and no process state left behind by load_cfg:
    its environment variables (ACCELERATE_MIXED_PRECISION, ...) and its debug.log / stdout tee."""
    saved_environ = dict(os.environ)
    os.environ["AXOLOTL_TEE_STDOUT"] = "0"
    monkeypatch.setattr(PluginManager, "_instance", None)  # the old one is put back afterwards
    yield
    close_debug_log()
    os.environ.clear()
    os.environ.update(saved_environ)


def write_yaml(tmp_path, base: dict, **overrides) -> str:
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is DROP:
            data.pop(key, None)
        else:
            data[key] = value
    data["output_dir"] = str(tmp_path / "out")
    data["dataset_prepared_path"] = str(tmp_path / "prepared")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def load(tmp_path, base: dict, **overrides) -> DictDefault:
    """Validate the YAML as every axolotl command does."""
    return load_cfg(write_yaml(tmp_path, base, **overrides))


def refused(tmp_path, base: dict, patterns: list[str], **overrides) -> None:
    with pytest.raises(ValidationError) as error:
        load(tmp_path, base, **overrides)
    # raised by axolotl's schema, extended with ChainLoraArgs
    assert error.value.title == "AxolotlConfigWCapabilities"
    message = str(error.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def chain_plugins() -> list[ChainLoraPlugin]:
    return [plugin for plugin in PluginManager.get_instance().plugins.values() if isinstance(plugin, ChainLoraPlugin)]


# ---------------------------------------------------------------- bad YAML: the chain keys


@pytest.mark.parametrize(
    ("overrides", "patterns"),
    [
        pytest.param(
            {"adapter": "mtlora"},
            [r"adapter: mtlora needs mtlora_structure", r"one of shim \| icfm \| ctcm \| dtsm"],
            id="mtlora-without-structure",
        ),
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "foo"},
            [r"\nmtlora_structure\n\s+Input should be 'shim', 'icfm', 'ctcm' or 'dtsm'"],
            id="mtlora-structure-foo",
        ),
        pytest.param(
            {"chain_init": "zeros"},
            [r"\nchain_init\n\s+Input should be 'kaiming', 'identity' or 'orthogonal'"],
            id="chain-init-zeros",
        ),
        pytest.param(
            {"lora_r": DROP},
            [r"adapter: linchain needs lora_r, a positive integer \(e\.g\. lora_r: 16\)"],
            id="no-lora-r",
        ),
        pytest.param(
            {"linchain_dims": [8, 16, 4]},
            [r"linchain_dims=\[8, 16, 4\] must start and end with lora_r=8", r"e\.g\. \[8, 16, 8\]"],
            id="dims-end-not-r",
        ),
        pytest.param(
            {"linchain_dims": [4, 16, 8]},
            [r"linchain_dims=\[4, 16, 8\] must start and end with lora_r=8", r"e\.g\. \[8, 16, 8\]"],
            id="dims-start-not-r",
        ),
        pytest.param(
            {"linchain_dims": [8, 0, 8]},
            [r"linchain_dims=\[8, 0, 8\] must be a list of at least two positive integers", r"e\.g\. \[8, 8, 8, 8\]"],
            id="dims-zero",
        ),
        pytest.param(
            {"linchain_dims": [8, -2, 8]},
            [r"linchain_dims=\[8, -2, 8\] must be a list of at least two positive integers", r"e\.g\. \[8, 8, 8, 8\]"],
            id="dims-negative",
        ),
        pytest.param(
            {"linchain_dims": [8]},
            [r"linchain_dims=\[8\] must be a list of at least two positive integers", r"e\.g\. \[8, 8, 8, 8\]"],
            id="dims-single",
        ),
        pytest.param(
            {"linchain_dims": []},
            [r"linchain_dims=\[\] must be a list of at least two positive integers"],
            id="dims-empty",
        ),
        pytest.param(
            {"linchain_dims": [8, 16, 8], "linchain_n": 3},
            [r"linchain_n=3 but linchain_dims=\[8, 16, 8\] has 2 factors", r"drop linchain_n or make them agree"],
            id="n-disagrees-with-dims",
        ),
        pytest.param(
            {"linchain_n": 0},
            [r"\nlinchain_n\n\s+Input should be greater than or equal to 1"],
            id="n-zero",
        ),
        pytest.param(
            {"linchain_n": -1},
            [r"\nlinchain_n\n\s+Input should be greater than or equal to 1"],
            id="n-negative",
        ),
        pytest.param(
            {"linchain_dims": [8, 16, 8], "lora_rank_pattern": {"q_proj": 4}},
            [
                r"adapter: linchain: linchain_dims fixes the rank of every layer and cannot be combined with "
                r"lora_rank_pattern",
                r"remove linchain_dims \(each layer then gets LinChain-3 of its own rank\) or lora_rank_pattern",
            ],
            id="dims-with-rank-pattern",
        ),
        pytest.param(
            {"linchain_n": 2, "lora_rank_pattern": {"q_proj": 4}},
            [
                r"linchain_n fixes the rank of every layer and cannot be combined with lora_rank_pattern",
                r"remove linchain_n",
            ],
            id="n-with-rank-pattern",
        ),
    ],
)
def test_bad_chain_keys_are_refused(tmp_path, base_yaml, overrides, patterns):
    refused(tmp_path, base_yaml, patterns, **overrides)


@pytest.mark.parametrize(
    ("overrides", "patterns"),
    [
        pytest.param(
            {"mtlora_structure": "icfm"},
            [r"mtlora_structure is for adapter: mtlora, not adapter: linchain: remove mtlora_structure"],
            id="mtlora_structure-with-linchain",
        ),
        pytest.param(
            {"mtlora_fused_splits": {"q_proj": 2}},
            [r"mtlora_fused_splits is for adapter: mtlora, not adapter: linchain: remove mtlora_fused_splits"],
            id="mtlora_fused_splits-with-linchain",
        ),
        pytest.param(
            {"adapter": "moslora", "linchain_dims": [8, 8]},
            [r"linchain_dims is for adapter: linchain, not adapter: moslora: remove linchain_dims"],
            id="linchain_dims-with-moslora",
        ),
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "shim", "linchain_n": 2},
            [r"linchain_n is for adapter: linchain, not adapter: mtlora: remove linchain_n"],
            id="linchain_n-with-mtlora",
        ),
        pytest.param(
            {"adapter": "lora", "chain_init": "identity"},
            [
                r"chain_init is for adapter: linchain \| moslora \| mtlora, but adapter is 'lora'",
                r"remove chain_init or set adapter",
            ],
            id="chain_init-with-lora",
        ),
        pytest.param(
            {"adapter": "lora", "linchain_n": 2},
            [r"linchain_n is for adapter: linchain, but adapter is 'lora': remove linchain_n or set adapter"],
            id="linchain_n-with-lora",
        ),
        pytest.param(
            {"adapter": "lora", "mtlora_structure": "shim"},
            [r"mtlora_structure is for adapter: mtlora, but adapter is 'lora': remove mtlora_structure"],
            id="mtlora_structure-with-lora",
        ),
        pytest.param(
            {"adapter": "qlora", "load_in_4bit": True, "chain_export_lora": True},
            [
                r"chain_export_lora is for adapter: linchain \| moslora \| mtlora, but adapter is 'qlora'",
                r"remove chain_export_lora or set adapter",
            ],
            id="chain_export_lora-with-qlora",
        ),
        pytest.param(
            {"adapter": DROP, "linchain_dims": [8, 8]},
            [r"linchain_dims is for adapter: linchain, but adapter is None: remove linchain_dims or set adapter"],
            id="linchain_dims-without-adapter",
        ),
    ],
)
def test_keys_of_another_adapter_are_refused(tmp_path, base_yaml, overrides, patterns):
    refused(tmp_path, base_yaml, patterns, **overrides)


# ---------------------------------------------------------------- bad YAML: combinations


def _combination_cases():
    cases = [
        (
            {"peft_use_dora": True},
            [r"adapter: {a}: peft_use_dora is another LoRA variant", r"remove peft_use_dora\."],
        ),
        ({"relora": True}, [r"relora cannot be used with adapter: {a}", r"Remove relora\."]),
        ({"gptq": True}, [r"gptq cannot be used with adapter: {a}", r"use load_in_4bit", r"Remove gptq\."]),
        (
            {"lora_target_parameters": ["mlp.experts.gate_up_proj"]},
            [
                r"adapter: {a}: lora_target_parameters \(LoRA on raw nn.Parameters\) is not supported",
                r"remove it and target the modules with lora_target_modules",
            ],
        ),
        (
            {"flash_attn_fuse_mlp": True},
            [r"flash_attn_fuse_mlp cannot be used with adapter: {a}", r"Remove flash_attn_fuse_mlp\."],
        ),
        (
            {"use_onebitllms": True},
            [r"use_onebitllms cannot be used with adapter: {a}: axolotl swaps the linear layers for BitNet ones"],
        ),
        ({"load_in_4bit": True, "load_in_8bit": True}, [r"load_in_4bit and load_in_8bit are both set: choose one"]),
        (
            {"load_in_4bit": True, "model_kwargs": {"quantization_config": {"load_in_4bit": True}}},
            [r"model_kwargs\.quantization_config is set together with load_in_4bit/load_in_8bit: keep one of them"],
        ),
        (
            {"peft": {"loftq_config": {"loftq_bits": 4}}},
            [r"peft\.loftq_config \(LoftQ init\) assumes LoRA without a core: remove it for adapter: {a}"],
        ),
    ]
    for init in ("pissa", "olora"):
        cases.append(
            (
                {"peft_init_lora_weights": init},
                [
                    rf"adapter: {{a}}: peft_init_lora_weights='{init}' builds A and B for a LoRA without a core",
                    r"use one of \(True, False, 'gaussian'\)",
                ],
            )
        )
    for adapter, adapter_keys in ADAPTERS.items():
        for overrides, patterns in cases:
            key = "+".join(f"{k}={v}" if isinstance(v, str) else k for k, v in overrides.items())
            yield pytest.param(
                {**adapter_keys, **overrides}, [p.format(a=adapter) for p in patterns], id=f"{adapter}-{key}"
            )


@pytest.mark.parametrize(("overrides", "patterns"), list(_combination_cases()))
def test_combinations_that_assume_no_core_are_refused(tmp_path, base_yaml, overrides, patterns):
    refused(tmp_path, base_yaml, patterns, **overrides)


# ---------------------------------------------------------------- mtlora_fused_splits and bools


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"mtlora_fused_splits": {"q_proj": 1}}, id="one-slice"),
        pytest.param({"mtlora_fused_splits": {"q_proj": [4, 0]}}, id="zero-slice-size"),
    ],
)
def test_bad_mtlora_fused_splits_are_refused(tmp_path, base_yaml, overrides):
    overrides = {"adapter": "mtlora", "mtlora_structure": "shim", **overrides}
    # what load_adapter would do later (so the YAML really is bad)
    cfg_fields = {"chain_type": "mtlora_shim", "chain_fused_splits": overrides["mtlora_fused_splits"]}
    with pytest.raises(ValueError, match="chain_fused_splits"):
        ChainLoraConfig(r=R, target_modules=["q_proj"], **cfg_fields)
    refused(tmp_path, base_yaml, [r"mtlora_fused_splits"], **overrides)


def test_bool_in_linchain_dims_is_refused(tmp_path, base_yaml):
    refused(
        tmp_path, base_yaml, [r"\nlinchain_dims\.1\n\s+Input should be a valid integer"], linchain_dims=[8, True, 8]
    )


# ---------------------------------------------------------------- good YAML


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"adapter": "lora"}, id="lora"),
        pytest.param({"adapter": "lora", "load_in_8bit": True}, id="lora-8bit"),
        pytest.param({"adapter": "qlora", "load_in_4bit": True}, id="qlora"),
        pytest.param(
            {"adapter": "lora", "merge_method": "memory_efficient", "lora_mlp_kernel": True, "peft_use_dora": True},
            id="lora-memory-efficient-dora",
        ),
    ],
)
@requires_entry_points
def test_plain_lora_is_left_to_axolotl(tmp_path, base_yaml, monkeypatch, overrides):
    """Our validator returns early: the cfg equals the one axolotl builds without this plugin."""
    path = write_yaml(tmp_path, base_yaml, **overrides)
    with_plugin = load_cfg(path)
    assert PLUGIN in PluginManager.get_instance().plugins

    # the same YAML in a process where this package's entry point is not installed
    axolotl_plugins.get_builtin_plugins()  # fill the entry-point cache
    monkeypatch.setattr(
        axolotl_plugins,
        "_plugin_entry_points",
        tuple(name for name in axolotl_plugins._plugin_entry_points if name != PLUGIN),
    )
    monkeypatch.setattr(PluginManager, "_instance", None)
    without_plugin = load_cfg(path)
    assert PLUGIN not in PluginManager.get_instance().plugins

    # our keys are in the merged schema with their defaults; every key of axolotl's is as without the plugin
    ours = ChainLoraArgs.model_fields
    assert {key: value for key, value in with_plugin.to_dict().items() if key not in ours} == without_plugin.to_dict()
    assert {key: with_plugin[key] for key in ours} == {key: field.default for key, field in ours.items()}
    assert with_plugin.merge_method != "legacy" or overrides.get("merge_method") == "legacy"
    assert not with_plugin.overrides_of_model_kwargs  # axolotl quantizes lora/qlora itself


@pytest.mark.parametrize("adapter", [*ADAPTERS, "lora"])
@pytest.mark.parametrize("merge_method", [None, "legacy", "memory_efficient"])
def test_either_merge_method_is_kept_and_the_efficient_merge_folds_chain_adapters(
    tmp_path, base_yaml, monkeypatch, adapter, merge_method
):
    monkeypatch.setattr(axolotl_merge_cli, "merge_lora_sharded_efficient", axolotl_efficient_merge)
    overrides = {"merge_method": merge_method} if merge_method else {}
    cfg = load(tmp_path, base_yaml, **({**ADAPTERS[adapter]} if adapter in ADAPTERS else {"adapter": adapter}),
               **overrides)  # fmt: skip
    # unset: axolotl's default, the memory-efficient merge (0.19 writes it into the config, 0.21 leaves it None), but
    # legacy for chain adapters where that merge would round unquantized modules through NF4 (axolotl < 0.21)
    default = ("legacy",) if adapter != "lora" and not EFFICIENT_MERGE_MATCHES_4BIT_TRAINING else (None, "memory_efficient")
    assert cfg.adapter == adapter and cfg.merge_method in ((merge_method,) if merge_method else default)
    assert not cfg.overrides_of_model_kwargs and not cfg.load_in_4bit and not cfg.load_in_8bit
    # registering the plugin, for any adapter, puts the fold in front of axolotl's efficient merge
    assert axolotl_merge_cli.merge_lora_sharded_efficient is merge_folded


def test_chain_keys_survive_validation(tmp_path, base_yaml):
    """axolotl drops keys its schema does not know: ours must be in the merged schema."""
    cfg = load(
        tmp_path, base_yaml, linchain_dims=[8, 16, 8], linchain_n=2, chain_init="identity", chain_export_lora=True
    )
    assert (cfg.linchain_dims, cfg.linchain_n, cfg.chain_init, cfg.chain_export_lora) == (
        [8, 16, 8],
        2,
        "identity",
        True,
    )
    cfg = load(tmp_path, base_yaml, adapter="mtlora", mtlora_structure="dtsm", mtlora_fused_splits={"q_proj": [4, 4]})
    assert (cfg.mtlora_structure, cfg.mtlora_fused_splits) == ("dtsm", {"q_proj": [4, 4]})


def _nf4(dtype: str) -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": dtype,
    }


@pytest.mark.parametrize(
    ("overrides", "model_kwargs"),
    [
        pytest.param({"load_in_4bit": True}, {"quantization_config": _nf4("float32")}, id="4bit-fp32"),
        pytest.param({"load_in_4bit": True, "bf16": True}, {"quantization_config": _nf4("bfloat16")}, id="4bit-bf16"),
        pytest.param({"load_in_4bit": True, "fp16": True}, {"quantization_config": _nf4("float16")}, id="4bit-fp16"),
        pytest.param(
            {"load_in_8bit": True},
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            id="8bit",
        ),
        pytest.param(
            {
                "load_in_4bit": True,
                "model_kwargs": {"low_cpu_mem_usage": True},
                "bnb_config_kwargs": {"bnb_4bit_use_double_quant": False},
            },
            {"low_cpu_mem_usage": True, "quantization_config": {**_nf4("float32"), "bnb_4bit_use_double_quant": False}},
            id="4bit-with-model_kwargs-and-bnb_config_kwargs",
        ),
    ],
)
def test_quantized_chain_adapter_gets_a_bitsandbytes_config(tmp_path, base_yaml, overrides, model_kwargs):
    cfg = load(tmp_path, base_yaml, adapter="moslora", **overrides)
    # `model_kwargs` is an alias: axolotl's model loader reads cfg.overrides_of_model_kwargs
    assert "model_kwargs" not in cfg
    assert cfg.overrides_of_model_kwargs == model_kwargs
    assert bool(cfg.load_in_4bit) == bool(overrides.get("load_in_4bit"))
    assert bool(cfg.load_in_8bit) == bool(overrides.get("load_in_8bit"))
    # what from_pretrained makes of the dict
    quantization = BitsAndBytesConfig.from_dict(dict(cfg.overrides_of_model_kwargs["quantization_config"]))
    assert quantization.load_in_4bit == bool(overrides.get("load_in_4bit"))
    assert quantization.load_in_8bit == bool(overrides.get("load_in_8bit"))
    if quantization.load_in_4bit:
        assert quantization.bnb_4bit_quant_type == "nf4"
        # the compute dtype is the dtype axolotl trains in
        assert quantization.bnb_4bit_compute_dtype == cfg.torch_dtype


def test_bf16_auto_compute_dtype_follows_axolotl(tmp_path, base_yaml):
    cfg = load(tmp_path, base_yaml, adapter="moslora", load_in_4bit=True, bf16="auto")
    compute = cfg.overrides_of_model_kwargs["quantization_config"]["bnb_4bit_compute_dtype"]
    assert getattr(torch, compute) == cfg.torch_dtype


def _revalidate_on_ray_worker(cfg: DictDefault) -> DictDefault:
    """What axolotl.cli.train.ray_train_func does with the driver's validated cfg on each worker."""
    worker_cfg = DictDefault(cfg.to_dict())
    PluginManager._instance = None  # a fresh worker process (the fixture restores the real one)
    prepare_plugins(worker_cfg)
    capabilities, env_capabilities = gpu_capabilities()
    return validate_config(worker_cfg, capabilities=capabilities, env_capabilities=env_capabilities)


def test_validated_chain_cfg_revalidates_on_a_ray_worker(tmp_path, base_yaml):
    cfg = load(tmp_path, base_yaml, use_ray=True, linchain_n=2)
    again = _revalidate_on_ray_worker(cfg)
    assert (again.adapter, again.linchain_n) == ("linchain", 2)
    assert all(again[kernel] is cfg[kernel] for kernel in KERNELS)


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_quantized_chain_cfg_revalidates_on_a_ray_worker(tmp_path, base_yaml, bits):
    cfg = load(tmp_path, base_yaml, adapter="moslora", use_ray=True, **{bits: True})
    again = _revalidate_on_ray_worker(cfg)
    assert again.overrides_of_model_kwargs == cfg.overrides_of_model_kwargs


# ---------------------------------------------------------------- validated cfg -> ChainLoraConfig


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        pytest.param({}, {"chain_type": "linchain", "chain_init": "kaiming"}, id="linchain-default"),
        pytest.param(
            {"linchain_n": 2}, {"chain_type": "linchain", "chain_init": "kaiming", "chain_dims": [R] * 3}, id="n2"
        ),
        pytest.param(
            {"linchain_n": 3, "lora_rank_pattern": {"q_proj": 4}},
            {"chain_type": "linchain", "chain_init": "kaiming"},
            id="n3-with-rank-pattern",
        ),
        pytest.param(
            {"linchain_dims": [8, 16, 8]},
            {"chain_type": "linchain", "chain_init": "kaiming", "chain_dims": [8, 16, 8]},
            id="dims",
        ),
        pytest.param(
            {"linchain_dims": [8, 16, 4, 8], "linchain_n": 3, "chain_init": "orthogonal"},
            {"chain_type": "linchain", "chain_init": "orthogonal", "chain_dims": [8, 16, 4, 8]},
            id="dims-and-n-agree",
        ),
        pytest.param(
            {"adapter": "moslora", "chain_init": "identity"},
            {"chain_type": "moslora", "chain_init": "identity"},
            id="moslora-identity",
        ),
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "icfm"},
            {"chain_type": "mtlora_icfm", "chain_init": "kaiming"},
            id="mtlora-icfm",
        ),
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "ctcm", "chain_init": "identity"},
            {"chain_type": "mtlora_ctcm", "chain_init": "identity"},
            id="mtlora-ctcm-identity",
        ),
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "shim", "mtlora_fused_splits": {"q_proj": 2}},
            {"chain_type": "mtlora_shim", "chain_init": "kaiming", "chain_fused_splits": {"q_proj": 2}},
            id="mtlora-shim-fused",
        ),
    ],
)
def test_chain_config_fields_of_a_validated_cfg(tmp_path, base_yaml, overrides, fields):
    cfg = load(tmp_path, base_yaml, **overrides)
    assert chain_config_fields(cfg) == fields
    config = ChainLoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern=dict(cfg.lora_rank_pattern or {}),
        **chain_config_fields(cfg),
    )
    for name, value in fields.items():
        assert getattr(config, name) == value, name


# ---------------------------------------------------------------- plugin discovery


@requires_entry_points
def test_plugin_is_found_without_a_plugins_line(tmp_path, base_yaml):
    assert PLUGIN in axolotl_plugins.get_builtin_plugins()  # the axolotl.plugins entry point
    cfg = load(tmp_path, base_yaml, linchain_n=2)
    assert "plugins" not in cfg
    assert PLUGIN in PluginManager.get_instance().plugins
    assert len(chain_plugins()) == 1
    assert (cfg.adapter, cfg.linchain_n) == ("linchain", 2)


@pytest.mark.parametrize(
    "plugins",
    [
        pytest.param([PLUGIN], id="dotted"),
        pytest.param(["axolotl_chainlora:ChainLoraPlugin"], id="entry-point-form"),
        pytest.param([PLUGIN, "axolotl_chainlora:ChainLoraPlugin"], id="both"),
    ],
)
@requires_entry_points
def test_plugins_line_does_not_register_twice(tmp_path, base_yaml, plugins):
    for _ in range(2):  # and a second config in the same process
        cfg = load(tmp_path, base_yaml, plugins=plugins, linchain_n=2)
        assert cfg.linchain_n == 2
        assert len(chain_plugins()) == 1
        assert [name for name in PluginManager.get_instance().plugins if "chainlora" in name] == [PLUGIN]


def test_shipped_demo_config_validates(demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)  # its paths are relative to the YAML's folder
    cfg = load_cfg("config.yml")
    assert (cfg.adapter, cfg.lora_r, cfg.chain_export_lora) == ("linchain", R, True)
    # axolotl's LoRA kernels are Triton GPU kernels
    assert all(cfg[kernel] is torch.cuda.is_available() for kernel in KERNELS)
    assert len(chain_plugins()) == 1
    assert chain_config_fields(cfg) == {"chain_type": "linchain", "chain_init": "kaiming"}


# ---------------------------------------------------------------- COLA keys

COLA = {"adapter": "lora", "cola_links": 3}


@pytest.mark.parametrize(
    ("overrides", "patterns"),
    [
        pytest.param(
            {"cola_knots": [0.5]}, [r"cola_knots=\[0\.5\] has 1 knots, but cola_links=3 needs 2"], id="knot-count"
        ),
        pytest.param(
            {"cola_knots": [0.8, 0.5]}, [r"cola_knots=\[0\.8, 0\.5\] must be strictly increasing"], id="decreasing"
        ),
        pytest.param({"cola_knots": [0.5, 1.5]}, [r"all fractions of the run strictly between 0 and 1"], id="past-one"),
        pytest.param(
            {"cola_knots": [20, 80], "max_steps": 60},
            [r"cola_knots=\[20, 80\] gives knot steps \[20, 80\] for a run of 60 steps", r"between 1 and 59"],
            id="past-end",
        ),
        pytest.param({"cola_ranks": [8, 4]}, [r"cola_ranks=\[8, 4\] must be 3 positive integers"], id="rank-count"),
        pytest.param(
            {"cola_ranks": [8, 0, 4]}, [r"cola_ranks=\[8, 0, 4\] must be 3 positive integers"], id="rank-zero"
        ),
        pytest.param(
            {"cola_ranks": [16, 8, 8]}, [r"cola_ranks=\[16, 8, 8\] must start with lora_r=8"], id="rank-first"
        ),
        pytest.param(
            {"cola_merge": "base", "load_in_4bit": True, "adapter": "qlora"},
            [r"cola_merge: base adds finished links into the base weights", r"use cola_merge: frozen"],
            id="base-4bit",
        ),
        pytest.param({"relora": True}, [r"relora cannot be used with cola_links"], id="relora"),
        pytest.param(
            {"deepspeed": "zero3.json", "cola_link_warmup_steps": 5},
            [r"cola_link_warmup_steps cannot act under DeepSpeed", r"remove cola_link_warmup_steps"],
            id="deepspeed-warmup",
        ),
        pytest.param(
            {"deepspeed": "zero2.json", "optimizer": "adamw_bnb_8bit"},
            [r"optimizer: adamw_bnb_8bit cannot be used with cola_links under DeepSpeed", r"Use adamw_torch"],
            id="deepspeed-8bit",
        ),
        pytest.param(
            {"deepspeed": "zero2.json", "lora_modules_to_save": ["lm_head"]},
            [r"lora_modules_to_save cannot be used with cola_links under DeepSpeed", r"step count per optimizer group"],
            id="deepspeed-modules-to-save",
        ),
        pytest.param(
            # refused by the plugin on axolotl 0.19, by axolotl itself on 0.21 (which dropped FSDP1)
            {"fsdp_version": 1, "fsdp_config": {"offload_params": False}},
            [r"FSDP1", r"fsdp_version: 2"],
            id="fsdp1",
        ),
        pytest.param(
            {"cola_ranks": [8, 4, 8]}, [r"cola_ranks=\[8, 4, 8\] must not increase", r"zero-padded"], id="rank-up"
        ),
        pytest.param({"adapter": "llama-adapter"}, [r"cola_links needs adapter: one of lora, qlora"], id="adapter"),
        pytest.param(
            {"cola_links": 1, "cola_knots": [0.5]}, [r"cola_knots is a COLA key, but cola_links is 1"], id="no-cola"
        ),
        pytest.param({"cola_links": 0}, [r"cola_links=0 must be a positive integer"], id="links-zero"),
        pytest.param(
            {"peft_init_lora_weights": False},
            [r"peft_init_lora_weights: false starts every link with B != 0"],
            id="init-false",
        ),
        pytest.param(
            {"lora_mlp_kernel": True, "lora_dropout": 0.1, "cola_merge": "frozen"},
            [
                r"lora_mlp_kernel: true: axolotl's LoRA kernels cannot compute adapter: lora exactly",
                r"would apply lora_dropout to their input too; set lora_dropout: 0",
            ],
            id="kernel-dropout-frozen",
        ),
        pytest.param(
            {"adapter": "linchain", "cola_ranks": [8, 4, 4], "linchain_dims": [8, 16, 8]},
            [r"cola_ranks steps the rank down, but linchain_dims fixes the rank"],
            id="ranks-dims",
        ),
    ],
)
def test_bad_cola_keys_are_refused(tmp_path, base_yaml, overrides, patterns):
    refused(tmp_path, base_yaml, patterns, **{**COLA, **overrides})


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param({}, id="ddp"),
        pytest.param({"deepspeed": "zero2.json"}, id="zero2"),
        pytest.param({"deepspeed": "zero3.json", "optimizer": "adamw_torch"}, id="zero3"),
        pytest.param({"fsdp_version": 2, "fsdp_config": {"offload_params": False}}, id="fsdp2"),
        # the step-down pads each fused slice's link (tests/unit/test_cola.py)
        pytest.param(
            {"adapter": "mtlora", "mtlora_structure": "shim", "mtlora_fused_splits": {"q_proj": 2}}, id="fused"
        ),
    ],
)
def test_a_rank_step_down_validates_on_every_engine_and_with_fused_splits(tmp_path, base_yaml, engine):
    # the schema only: normalize_config would start DeepSpeed's process group
    cfg = validated(tmp_path, base_yaml, **{**COLA, **engine}, cola_ranks=[8, 4, 4])
    assert cfg.cola_ranks == [8, 4, 4]


@pytest.mark.parametrize("adapter", ["lora", "qlora", "linchain"])
def test_cola_cfg_validates(tmp_path, base_yaml, adapter):
    extra = {"load_in_4bit": True} if adapter == "qlora" else {}
    settings = {"cola_knots": [0.5, 0.8], "cola_ranks": [8, 4, 4], "cola_merge": "frozen",
                "cola_link_warmup_steps": 5, "cola_reset_optimizer": True}  # fmt: skip
    cfg = load(tmp_path, base_yaml, **{**COLA, "adapter": adapter, **settings, **extra})
    assert (cfg.cola_links, cfg.cola_knots, cfg.cola_ranks) == (3, [0.5, 0.8], [8, 4, 4])
    assert (cfg.cola_merge, cfg.cola_link_warmup_steps, cfg.cola_reset_optimizer) == ("frozen", 5, True)


# ---------------------------------------------------------------- axolotl's LoRA kernels


@pytest.fixture
def on_a_gpu(monkeypatch):
    """A machine with a CUDA device, as far as the kernel choice can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def validated(tmp_path, base: dict, gpus: int | None = None, **overrides) -> DictDefault:
    """The YAML through plugin registration and the schema only: normalize_config would probe the (mocked) GPU.
    `gpus`: the number of GPUs the schema is told of, instead of this machine's."""
    cfg = DictDefault(yaml.safe_load(open(write_yaml(tmp_path, base, **overrides))))
    PluginManager._instance = None
    prepare_plugins(cfg)
    capabilities, env_capabilities = gpu_capabilities()
    if gpus is not None:
        capabilities = {**capabilities, "n_gpu": gpus}
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)


def kernel_flags(cfg) -> dict[str, bool]:
    return {kernel: cfg[kernel] for kernel in KERNELS}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="float"),
        pytest.param({"load_in_4bit": True}, id="4bit"),
        pytest.param({"lora_dropout": 0.1}, id="dropout"),
        pytest.param({"load_in_8bit": True}, id="8bit"),
        pytest.param({"rl": "dpo"}, id="rl"),
    ],
)
def test_chain_adapter_gets_the_kernels_axolotl_gives_lora(tmp_path, base_yaml, on_a_gpu, adapter, overrides):
    """On a GPU the kernels are on where axolotl turns them on for the same lora/qlora config, off where not."""
    lora = validated(tmp_path, base_yaml, adapter="qlora" if overrides.get("load_in_4bit") else "lora", **overrides)
    chain = validated(tmp_path, base_yaml, **ADAPTERS[adapter], **overrides)
    assert kernel_flags(chain) == {kernel: bool(on) for kernel, on in kernel_flags(lora).items()}
    assert all(kernel_flags(chain).values()) is ("load_in_8bit" not in overrides and "rl" not in overrides)


def test_kernels_stay_off_without_a_gpu(tmp_path, base_yaml, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with logged(logging.INFO) as messages:
        cfg = load(tmp_path, base_yaml)
    assert not any(kernel_flags(cfg).values())
    assert "adapter: linchain: axolotl's LoRA kernels are off (no CUDA device: they are Triton GPU kernels)" in messages


@pytest.mark.parametrize("adapter", ["lora", "linchain"])
def test_cola_keeps_kernels_on_unless_tied_links_beside_the_base_meet_dropout(tmp_path, base_yaml, on_a_gpu, adapter):
    cola = {**COLA, "adapter": adapter, "lora_dropout": 0.1}
    # float32 base: the tied links go into the base weights, where the kernels read them undropped
    assert all(kernel_flags(validated(tmp_path, base_yaml, **cola)).values())
    # beside the base: off, as the kernels would drop out their input too (axolotl turns them on for lora)
    assert not any(kernel_flags(validated(tmp_path, base_yaml, **cola, cola_merge="frozen")).values())
    assert all(
        kernel_flags(validated(tmp_path, base_yaml, **{**cola, "lora_dropout": 0.0}, cola_merge="frozen")).values()
    )


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        pytest.param({"load_in_8bit": True}, r"they do not run on 8-bit bases \(load_in_8bit\)", id="8bit"),
        pytest.param({"deepspeed": 3}, r"under DeepSpeed ZeRO-3 they read the adapter tensors", id="zero3"),
        pytest.param(
            {"cola_links": 2, "cola_merge": "frozen", "lora_dropout": 0.05},
            r"this COLA run keeps the tied links beside the base .* set lora_dropout: 0",
            id="cola-dropout",
        ),
    ],
)
def test_kernels_that_cannot_be_exact_are_refused(tmp_path, base_yaml, overrides, pattern):
    if "deepspeed" in overrides:  # a ZeRO stage: the YAML names a JSON file
        overrides = {"deepspeed": write_deepspeed_config(tmp_path, stage=overrides["deepspeed"])}
    refused(
        tmp_path,
        base_yaml,
        [
            rf"lora_qkv_kernel: true: axolotl's LoRA kernels cannot compute adapter: linchain exactly here: {pattern}",
            r"Set lora_qkv_kernel to false, or remove them",
        ],
        lora_qkv_kernel=True,
        **overrides,
    )


def write_deepspeed_config(tmp_path, stage: int) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}))
    return str(path)


def test_kernels_under_zero2_are_kept(tmp_path, base_yaml):
    cfg = validated(tmp_path, base_yaml, lora_qkv_kernel=True, deepspeed=write_deepspeed_config(tmp_path, stage=2))
    assert cfg.lora_qkv_kernel is True


# ---------------------------------------------------------------- typos and names


@pytest.fixture
def warnings_logged():
    """The package's WARNING lines (axolotl's logging set-up may keep them from pytest's caplog)."""
    with logged(logging.WARNING) as messages:
        yield messages


@pytest.mark.parametrize(
    ("typo", "value", "meant"),
    [
        pytest.param("linchian_n", 2, "linchain_n", id="swapped-letters"),
        pytest.param("cola_knot", [0.5], "cola_knots", id="missing-letter"),
        pytest.param("chain_inits", "identity", "chain_init", id="extra-letter"),
        pytest.param("mtlora_structura", "icfm", "mtlora_structure", id="wrong-letter"),
    ],
)
def test_a_key_one_edit_from_ours_warns_naming_the_key_meant(tmp_path, base_yaml, warnings_logged, typo, value, meant):
    cfg = load(tmp_path, base_yaml, **{typo: value})
    assert typo not in cfg  # axolotl drops it: the run would train with the default of `meant`
    assert f"{typo} is not a config key and is ignored; did you mean {meant}?" in warnings_logged


def test_correct_keys_and_unrelated_unknown_keys_do_not_warn(tmp_path, base_yaml, warnings_logged):
    """The control: our keys spelled right, axolotl's own keys, and a key far from any of ours."""
    load(tmp_path, base_yaml, linchain_n=2, chain_init="identity", lora_dropout=0.1, my_run_note="first try")
    assert not [message for message in warnings_logged if "did you mean" in message]


def test_our_validators_do_not_replace_axolotls():
    """pydantic keeps one validator per name: a name of ours equal to one of axolotl's would silently drop axolotl's
    check from the merged schema (axolotl has a `check_relora`, for one)."""
    ours = set(ChainLoraArgs.__pydantic_decorators__.model_validators)
    axolotl = set(AxolotlConfigWCapabilities.__pydantic_decorators__.model_validators)
    assert "check_relora" in axolotl and ours and not ours & axolotl


# ---------------------------------------------------------------- COLA under preference trainers


@pytest.mark.parametrize(
    ("rl", "extra", "merge"),
    [
        pytest.param(None, {}, "auto", id="sft"),
        pytest.param("dpo", {}, "frozen", id="dpo"),
        pytest.param("ipo", {}, "frozen", id="ipo"),
        pytest.param("kto", {}, "frozen", id="kto"),
        pytest.param("orpo", {}, "auto", id="orpo-reference-free"),
        pytest.param("simpo", {}, "auto", id="simpo-reference-free"),
        pytest.param("grpo", {"trl": {"beta": 0.04}}, "frozen", id="grpo-with-kl"),
        pytest.param("grpo", {"trl": {"beta": 0.0}}, "auto", id="grpo-without-kl"),
        # axolotl loads the reference as a model of its own: the policy's base weights are not its
        pytest.param("dpo", {"rl_adapter_ref_model": True}, "auto", id="dpo-reference-loaded-apart"),
    ],
)
def test_cola_auto_keeps_links_beside_the_base_where_the_reference_runs_on_it(rl, extra, merge):
    """cola_merge: auto on a float32 base ties into the base, unless the trainer's reference model runs on the
    policy's base weights (which the tie would move to the policy)."""
    cfg = {"adapter": "linchain", "cola_links": 2, "rl": rl, **extra}
    assert cola_schedule(cfg).merge == merge
    assert ties_into_base(cfg) is (merge == "auto")
    # a DPO run that asks for base explicitly is refused (below), not rewritten
    assert cola_schedule({**cfg, "cola_merge": "base"}).merge == "base"


@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_cola_merge_base_is_refused_where_the_reference_is_the_disabled_adapter(tmp_path, base_yaml, rl):
    settings = {"adapter": "linchain", "cola_links": 2, "cola_merge": "base", "rl": rl, "remove_unused_columns": False}
    refused(tmp_path, base_yaml, [rf"cola_merge: base with rl: {rl} would add finished links into the base weights",
                                  r"use cola_merge: frozen \(or auto\)"], **settings)  # fmt: skip
    # the reference-free ORPO may tie into the base
    assert validated(tmp_path, base_yaml, **{**settings, "rl": "orpo"}).cola_merge == "base"


# ---------------------------------------------------------------- adapter: lora on a saved chain adapter


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, str]:
    """A saved LinChain-2 adapter, an MTLoRA-CTCM one, a COLA run's one on plain LoRA and a plain PEFT LoRA."""
    path = tmp_path_factory.mktemp("adapters")
    configs = {
        "linchain": chain_config("linchain"),
        "mtlora": chain_config("mtlora_ctcm"),
        "cola-lora": chain_config("lora", cola_tied_ranks=[4]),
        "plain": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    }
    for name, config in configs.items():
        get_peft_model(tiny_llama(), config).save_pretrained(path / name)
    return {name: str(path / name) for name in configs}


@pytest.mark.parametrize(
    ("saved", "adapter", "fix"),
    [
        ("linchain", "lora", r"set adapter: linchain, lora_r: 4, linchain_dims: \[4, 8, 4\]"),
        ("linchain", "qlora", r"set adapter: linchain, lora_r: 4"),
        ("mtlora", "lora", r"set adapter: mtlora, lora_r: 4, mtlora_structure: ctcm"),
        ("cola-lora", "lora", r"set the cola_\* keys of the COLA run that saved it"),
    ],
)
def test_lora_yaml_on_a_saved_chain_adapter_is_refused_naming_the_fix(
    tmp_path, base_yaml, saved_adapters, saved, adapter, fix
):
    directory = saved_adapters[saved]
    extra = {"load_in_4bit": True} if adapter == "qlora" else {}
    refused(tmp_path, base_yaml, [
        rf"lora_model_dir={re.escape(directory)} holds a chain adapter \(peft_type LORA_CHAIN", fix,
        rf"or fold it into a plain LoRA first \(axolotl-chainlora export {re.escape(directory)} OUT_DIR\)",
    ], adapter=adapter, lora_model_dir=directory, **extra)  # fmt: skip


# ---------------------------------------------------------------- continuing a saved adapter: lora_model_dir

SAVED_LINCHAIN = {"adapter": "linchain", "lora_r": 4, "lora_alpha": 8, "linchain_dims": [4, 8, 4]}


@pytest.mark.parametrize(
    ("saved", "yaml", "refusal"),
    [
        pytest.param("linchain", SAVED_LINCHAIN, None, id="same-linchain"),
        pytest.param("linchain", {**SAVED_LINCHAIN, "lora_r": 8, "linchain_dims": [8, 8, 8]},
                     r"was saved with r=4 but this config asks for 8", id="other-rank"),
        pytest.param("linchain", {**SAVED_LINCHAIN, "linchain_dims": [4, 4, 4, 4]},
                     r"was saved with chain_dims=\[4, 8, 4\] but this config asks for \[4, 4, 4, 4\]", id="other-dims"),
        pytest.param("linchain", {**SAVED_LINCHAIN, "lora_alpha": 16}, r"was saved with lora_alpha=8",
                     id="other-alpha"),
        pytest.param("linchain", {**SAVED_LINCHAIN, "peft_use_rslora": True}, r"was saved with use_rslora=None",
                     id="rslora"),
        pytest.param("linchain", {**SAVED_LINCHAIN, "adapter": "moslora", "linchain_dims": None},
                     r"was saved with chain_type='linchain' but this config asks for 'moslora'", id="other-chain-type"),
        pytest.param("mtlora", {**SAVED_LINCHAIN, "adapter": "mtlora", "mtlora_structure": "icfm",
                                "linchain_dims": None},
                     r"chain_type='mtlora_ctcm' but this config asks for 'mtlora_icfm'", id="other-structure"),
        pytest.param("plain", SAVED_LINCHAIN, r"holds a LoraConfig adapter, not adapter: linchain", id="chain-on-lora"),
        pytest.param("linchain", {"adapter": "lora", "lora_r": 4, "lora_alpha": 8},
                     r"holds a chain adapter \(peft_type LORA_CHAIN", id="lora-on-chain"),
        pytest.param("cola-lora", {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, **COLA}, None, id="cola-lora"),
        # COLA compares no rank: the last link has the last of cola_ranks
        pytest.param("linchain", {**COLA, **SAVED_LINCHAIN}, None, id="cola-linchain"),
        pytest.param("cola-lora", {**COLA, **SAVED_LINCHAIN}, r"chain_type='lora' but this config asks for 'linchain'",
                     id="cola-other-chain-type"),
    ],
)  # fmt: skip
def test_the_adapter_to_continue_is_checked_before_the_model_loads(tmp_path, base_yaml, saved_adapters, saved, yaml,
                                                                     refusal):  # fmt: skip
    """Every direction of continuation: the same adapter validates; another rank, core, alpha, rsLoRA or adapter
    type is refused at validation, naming the key (before the model loads, so no device is touched)."""
    settings = {key: value for key, value in yaml.items() if value is not None}
    settings = {**settings, "lora_model_dir": saved_adapters[saved]}
    base = {key: value for key, value in base_yaml.items() if key not in ("linchain_dims", "linchain_n")}
    if refusal is None:
        assert validated(tmp_path, base, **settings).lora_model_dir == saved_adapters[saved]
    else:
        refused(tmp_path, base, [refusal], **settings)


@pytest.mark.parametrize("rl", ["dpo", "ipo", "kto"])
def test_an_adapter_to_continue_is_refused_where_trl_builds_a_fresh_one(tmp_path, base_yaml, saved_adapters, rl):
    """axolotl hands DPO, IPO and KTO the adapter's config only: TRL would build a fresh adapter and drop the saved
    one without a word. ORPO, whose adapter axolotl loads itself, continues (the control)."""
    settings = {**SAVED_LINCHAIN, "lora_model_dir": saved_adapters["linchain"], "remove_unused_columns": False}
    refused(tmp_path, base_yaml, [rf"would not be loaded with rl: {rl}", r"merge it into the base first"],
            rl=rl, **settings)  # fmt: skip
    assert validated(tmp_path, base_yaml, rl="orpo", **settings).lora_model_dir == saved_adapters["linchain"]


def test_lora_yaml_on_a_plain_lora_and_a_cola_yaml_on_its_own_adapter_validate(tmp_path, base_yaml, saved_adapters):
    cfg = load(tmp_path, base_yaml, adapter="lora", lora_model_dir=saved_adapters["plain"])
    assert cfg.lora_model_dir == saved_adapters["plain"]
    cfg = load(tmp_path, base_yaml, **COLA, lora_alpha=8, lora_model_dir=saved_adapters["cola-lora"])
    assert cfg.lora_model_dir == saved_adapters["cola-lora"]


# ---------------------------------------------------------------- what axolotl refuses for lora/qlora, or misnames


@pytest.mark.parametrize("adapter", ["LinChain", "MOSLORA"])
def test_a_chain_adapter_in_the_wrong_case_is_named(tmp_path, base_yaml, adapter):
    with pytest.raises(ValueError, match=rf"adapter: {adapter} is not an adapter name \(they are lower case\): set "
                                         rf"adapter: {adapter.lower()}\."):  # fmt: skip
        load(tmp_path, base_yaml, adapter=adapter)


def test_lora_fp32_gradients_is_refused_naming_why(tmp_path, base_yaml):
    with pytest.raises(ValueError, match=r"lora_fp32_gradients cannot be used with adapter: linchain: axolotl applies "
                                         r"it to lora/qlora only.*remove lora_fp32_gradients"):  # fmt: skip
        load(tmp_path, base_yaml, lora_fp32_gradients=True)


GRPO_VLLM = {"rl": "grpo", "trl": {"use_vllm": True, "vllm_mode": "server"}}


@pytest.mark.parametrize("setting", [{"adapter": "linchain"}, {"adapter": "lora", "cola_links": 2}])
@pytest.mark.parametrize("key", ["async_prefetch", "use_data_producer", "vllm_lora_sync"])
def test_vllm_syncs_that_bypass_the_merge_are_refused(tmp_path, base_yaml, setting, key):
    trl = {**GRPO_VLLM["trl"], key: True}
    refused(tmp_path, base_yaml, [rf"trl\.{key} cannot be used with trl\.use_vllm and", rf"Remove trl\.{key}"],
            **{**GRPO_VLLM, **setting, "trl": trl})  # fmt: skip


def test_the_synchronous_vllm_sync_validates(tmp_path, base_yaml):
    cfg = validated(tmp_path, base_yaml, **GRPO_VLLM)
    assert cfg.trl.use_vllm and not cfg.trl.async_prefetch


@pytest.mark.parametrize("gpus", [1, 2])
def test_distributed_rl_with_reentrant_checkpointing_on_a_4bit_chain_adapter_is_refused(tmp_path, base_yaml, gpus):
    """axolotl's refusal for qlora (a TRL bug), made for a chain adapter on a 4-bit base too."""
    settings = {"rl": "dpo", "load_in_4bit": True, "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True}}  # fmt: skip
    if gpus == 1:
        assert validated(tmp_path, base_yaml, gpus=gpus, **settings).load_in_4bit
        return
    with pytest.raises(ValidationError, match=r"use_reentrant: true is not supported for distributed RL training of "
                                              r"adapter: linchain on a 4-bit base.*set use_reentrant: false"):  # fmt: skip
        validated(tmp_path, base_yaml, gpus=gpus, **settings)


@pytest.mark.parametrize("rl", ["dpo", "ipo", "kto"])
def test_cola_on_plain_lora_is_refused_where_trl_builds_the_adapter(tmp_path, base_yaml, rl):
    """axolotl passes TRL a LoraConfig for DPO, IPO and KTO, so the plugin cannot rebuild the layers as chain layers
    (`axolotl train` used to stop in post_lora_load: 'LlamaForCausalLM' object has no attribute 'peft_config')."""
    settings = {**COLA, "rl": rl, "remove_unused_columns": False}
    refused(tmp_path, base_yaml, [rf"cola_links with adapter: lora cannot be used with rl: {rl}",
                                  r"Use a chain adapter \(adapter: linchain, moslora or mtlora\) with cola_links"],
            **settings)  # fmt: skip
    assert validated(tmp_path, base_yaml, **{**settings, "adapter": "moslora"}).cola_links == 3
