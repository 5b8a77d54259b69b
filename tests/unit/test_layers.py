"""The chain layers against the papers' formulas, PEFT's LoRA lifecycle and save/load paths."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    ALPHA,
    LINCHAIN_DIMS,
    TARGETS,
    R,
    chain_config,
    chain_layers,
    chain_model,
    core_factors,
    randomize_adapters,
    reference_core,
    tiny_gpt2,
    tiny_llama,
)
from peft import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    convert_to_lora,
    get_peft_model,
    set_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM

import axolotl_chainlora
from axolotl_chainlora import CHAIN_TYPES, ChainLoraConfig, core_parameter_count

# the types with a core; 'lora' (no core, for COLA) is tested in test_cola.py
CORE_TYPES = [chain_type for chain_type in CHAIN_TYPES if chain_type != "lora"]


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def layer_reference(layer, x: torch.Tensor, chain_type: str, scaling: float) -> torch.Tensor:
    """W0 x + s B T A x from the raw tensors, float64."""
    A = layer.lora_A["default"].weight.double()
    B = layer.lora_B["default"].weight.double()
    T = reference_core(chain_type, core_factors(layer))
    base_out = layer.get_base_layer()(x).double()
    return base_out + scaling * x.double() @ A.T @ T.T @ B.T


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_forward_is_base_plus_scaled_B_T_A(chain_type, use_rslora):
    model = chain_model(chain_type, use_rslora=use_rslora)
    layer = q_proj(model)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    scaling = ALPHA / R**0.5 if use_rslora else ALPHA / R
    expected = layer_reference(layer, x, chain_type, scaling)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    # the core matters: plain LoRA with the same A and B gives something else
    plain = layer.get_base_layer()(x).double() + scaling * (
        x.double() @ layer.lora_A["default"].weight.double().T @ layer.lora_B["default"].weight.double().T
    )
    assert (plain - expected).abs().max() > 1e-2


def test_square_linchain_forward_and_merge_multiply_the_factors_in_the_papers_order(input_ids):
    """LinChain's default (three r x r factors) multiplies in any order, so only the values tell T = W1 W2 W3 from
    W3 W2 W1; the widening chains above would fail a reversed order on shape alone."""
    base = tiny_llama()
    model = chain_model("linchain", base=copy.deepcopy(base), chain_dims=None)
    layers = chain_layers(model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    updates = {}
    for name, layer in layers.items():
        factors = core_factors(layer)
        assert [tuple(f.shape) for f in factors] == [(R, R)] * 3, name
        # the control: these factors do not commute, so a reversed product is another update
        reversed_T = reference_core("linchain", factors[::-1])
        assert (reference_core("linchain", factors) - reversed_T).abs().max() > 0.1, name
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        updates[name] = ALPHA / R * B @ reference_core("linchain", factors) @ A
        if layer.in_features == x.shape[1]:
            expected = layer_reference(layer, x, "linchain", ALPHA / R)
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    merged = model.merge_and_unload(safe_merge=True)
    for name, update in updates.items():
        module = name.removeprefix("base_model.model.")
        delta = merged.get_submodule(module).weight.double() - base.get_submodule(module).weight.double()
        torch.testing.assert_close(delta, update, rtol=0, atol=1e-6, msg=name)


def test_gpt2_conv1d_honours_fan_in_fan_out():
    model = chain_model("moslora", base=tiny_gpt2(), target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    expected = layer_reference(layer, x, "moslora", ALPHA / R)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    # the merged weight lands in Conv1D's (in x out) layout
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.get_base_layer()(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chain_init", ["kaiming", "identity", "orthogonal"])
@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_output_equals_base_at_initialisation(chain_type, chain_init, input_ids):
    base = tiny_llama()
    expected = base(input_ids).logits
    model = get_peft_model(copy.deepcopy(base), chain_config(chain_type, chain_init=chain_init)).eval()
    assert torch.equal(model(input_ids).logits, expected)


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_identity_and_orthogonal_inits(chain_type):
    for chain_init in ("identity", "orthogonal"):
        # square factors (the default [r, r, r, r]): a widening chain of semi-orthogonal factors is a contraction
        model = get_peft_model(tiny_llama(), chain_config(chain_type, chain_init=chain_init, chain_dims=None))
        T = reference_core(chain_type, core_factors(q_proj(model)))
        eye = torch.eye(R, dtype=torch.float64)
        if chain_init == "identity":
            torch.testing.assert_close(T, eye)
        else:  # every structure starts orthogonal, so the core keeps the signal's norm
            torch.testing.assert_close(T @ T.T, eye, atol=1e-5, rtol=0)


def test_kaiming_core_is_the_papers_uniform_draw():
    model = get_peft_model(tiny_llama(), chain_config("linchain", chain_dims=[R, 3 * R, R]))
    first, second = core_factors(q_proj(model))
    assert first.shape == (R, 3 * R) and second.shape == (3 * R, R)
    # kaiming_uniform(a=sqrt 5) on a (rows x fan_in) weight is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert first.abs().max() <= 1 / (3 * R) ** 0.5 and second.abs().max() <= 1 / R**0.5
    assert first.std() > 0.5 / (3 * (3 * R)) ** 0.5


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_two_optimizer_steps_move_every_adapter_tensor(chain_type, input_ids):
    model = get_peft_model(tiny_llama(), chain_config(chain_type))
    model.train()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert any(".lora_core." in name for name in trainable)
    assert all("lora_" in name for name in trainable)
    start = {name: param.detach().clone() for name, param in trainable.items()}
    # no weight decay: it would move every tensor whatever its gradient
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)

    def step():
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()

    step()
    # B = 0 at the start, so only B has a gradient on the first step
    moved = {name for name, param in trainable.items() if not torch.equal(param, start[name])}
    assert moved == {name for name in trainable if ".lora_B." in name}
    step()
    unmoved = [name for name, param in trainable.items() if torch.equal(param, start[name])]
    assert unmoved == []


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_merge_unmerge_disable_and_merge_and_unload(chain_type, input_ids):
    base = tiny_llama()
    base_logits = base(input_ids).logits
    model = chain_model(chain_type, base=copy.deepcopy(base))
    expected = model(input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-2

    model.merge_adapter()
    torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids).logits, base_logits, atol=1e-5, rtol=0)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=0)


def test_merge_with_lora_bias(input_ids):
    base = tiny_gpt2()
    model = chain_model("mtlora_dtsm", base=base, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)
    expected = model(input_ids).logits
    merged = model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_save_then_load_in_peft_and_transformers(chain_type, tiny_llama_dir, tmp_path, input_ids):
    model = chain_model(chain_type, base=AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA_CHAIN" and saved["chain_type"] == chain_type

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path)
    assert isinstance(reloaded.peft_config["default"], ChainLoraConfig)
    assert torch.equal(reloaded(input_ids).logits, expected)

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(auto(input_ids).logits, expected)

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain.load_adapter(str(tmp_path))
    assert isinstance(q_proj_of(plain), axolotl_chainlora.layer.Linear)
    reloaded_state = reloaded.base_model.model.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, reloaded_state[name]), name
    # same tensors, but transformers leaves them at other memory alignments, where CPU matmuls may round
    # differently: float32 rounding, not bit equality
    torch.testing.assert_close(plain(input_ids).logits, expected, atol=1e-6, rtol=0)


def q_proj_of(transformers_model):
    return transformers_model.model.layers[0].self_attn.q_proj


def test_trainable_reload_continues_training(tiny_llama_dir, tmp_path, input_ids):
    model = chain_model("linchain", base=AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path, is_trainable=True
    )
    trainable = [name for name, param in reloaded.named_parameters() if param.requires_grad]
    assert sum(".lora_core." in name for name in trainable) == 2 * len(TARGETS) * 2  # 2 layers, 2 factors


def test_multiple_named_adapters(input_ids):
    base = tiny_llama()
    first = chain_model("linchain", base=copy.deepcopy(base))
    second = chain_model("mtlora_icfm", base=copy.deepcopy(base))
    first_logits, second_logits = first(input_ids).logits, second(input_ids).logits

    model = copy.deepcopy(first)
    model.add_adapter("other", chain_config("mtlora_icfm"))
    model.load_state_dict(
        {k.replace(".default.", ".other."): v for k, v in second.state_dict().items() if "lora_" in k}, strict=False
    )
    assert torch.equal(model(input_ids).logits, first_logits)
    model.set_adapter("other")
    assert torch.equal(model(input_ids).logits, second_logits)

    # a mixed batch routes each row through its own adapter
    names = ["default", "other", "default"]
    mixed = model(input_ids, adapter_names=names).logits
    for row, name in enumerate(names):
        expected = first_logits if name == "default" else second_logits
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-6, rtol=0)

    model.delete_adapter("default")
    assert set(q_proj(model).lora_core.keys()) == {"other"}
    assert torch.equal(model(input_ids).logits, second_logits)


def test_plain_lora_adapter_beside_a_chain_adapter(input_ids):
    base = tiny_llama()
    plain_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    plain = get_peft_model(copy.deepcopy(base), plain_config)
    randomize_adapters(plain, seed=5)
    plain.eval()
    model = chain_model("moslora", base=copy.deepcopy(base))
    model.add_adapter("plain", plain_config)
    model.load_state_dict(
        {k.replace(".default.", ".plain."): v for k, v in plain.state_dict().items() if "lora_" in k}, strict=False
    )
    model.set_adapter("plain")
    assert "plain" not in q_proj(model).lora_core
    torch.testing.assert_close(model(input_ids).logits, plain(input_ids).logits, atol=1e-6, rtol=0)


def expected_core_parameters(chain_type: str, r: int, dims: list[int] | None) -> int:
    """The papers' parameter counts of the core, written out independently of cores.py."""
    if chain_type == "linchain":
        return sum(a * b for a, b in zip(dims, dims[1:]))
    return {"moslora": r * r, "mtlora_shim": r * r, "mtlora_icfm": r * r}.get(chain_type, 2 * r * r)


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_trainable_parameter_count_matches_formula(chain_type):
    base = tiny_llama()
    model = get_peft_model(base, chain_config(chain_type))
    trainable, _ = model.get_nb_trainable_parameters()
    dims = LINCHAIN_DIMS if chain_type == "linchain" else None
    adapted = [m for m in model.modules() if hasattr(m, "lora_core")]
    assert len(adapted) == 2 * len(TARGETS)
    expected = sum(
        (m.in_features + m.out_features) * R + expected_core_parameters(chain_type, R, dims) for m in adapted
    )
    assert trainable == expected


@pytest.mark.parametrize("chain_type", CORE_TYPES)
def test_public_core_parameter_count_matches_formula(chain_type):
    dims = [8, 16, 8] if chain_type == "linchain" else None
    assert core_parameter_count(chain_type, 8, dims) == expected_core_parameters(chain_type, 8, dims)


def test_linchain_default_is_three_square_factors_as_in_the_paper():
    model = get_peft_model(
        tiny_llama(), ChainLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], chain_type="linchain")
    )
    layer = q_proj(model)
    assert [tuple(f.shape) for f in core_factors(layer)] == [(R, R)] * 3
    trainable, _ = model.get_nb_trainable_parameters()
    # LinChain paper eq. 12: (d_in + d_out) r + n r^2 per layer, n = 3
    assert trainable == 2 * ((layer.in_features + layer.out_features) * R + 3 * R * R)


def test_rank_pattern_gives_each_layer_its_own_square_chain():
    config = ChainLoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, chain_type="linchain", rank_pattern={"down_proj": 2}
    )
    model = get_peft_model(tiny_llama(), config)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert [tuple(f.shape) for f in core_factors(down)] == [(2, 2)] * 3
    assert [tuple(f.shape) for f in core_factors(q_proj(model))] == [(R, R)] * 3


def test_peft_svd_conversion_sees_the_core(input_ids):
    # PEFT's convert_to_lora works from get_delta_weight; the update has rank <= r, so rank r is exact
    model = chain_model("linchain")
    expected = model(input_ids).logits
    lora_config, state_dict = convert_to_lora(model, rank=R)
    converted = get_peft_model(tiny_llama(), lora_config)
    set_peft_model_state_dict(converted, state_dict)
    torch.testing.assert_close(converted.eval()(input_ids).logits, expected, atol=1e-5, rtol=0)
