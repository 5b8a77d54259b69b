"""axolotl's fused LoRA kernels compute the chain adapters exactly.

Through axolotl's real patchers (`patch_self_attn_lora`, `apply_lora_kernel_patches`) on a tiny Llama with
every projection adapted, the kernel path and PEFT's path are each compared with a float64 computation of
the same model (the same effective weights: a 4-bit base's are its dequantized ones). On the CPU, Triton's
interpreter runs axolotl's SwiGLU kernel (tests/conftest.py sets TRITON_INTERPRET=1 before Triton loads);
the only stand-in is the output allocation of `swiglu_forward`, which axolotl makes on device="cuda"
(tests/e2e/cpu_kernels/cpu_swiglu.py).
"""

from __future__ import annotations

import copy

import axolotl.kernels.lora as axolotl_lora
import axolotl.kernels.swiglu as axolotl_swiglu
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from cpu_swiglu import swiglu_forward_on_input_device
from helpers import (
    LINCHAIN_DIMS,
    PROJECTIONS,
    chain_layers,
    chain_model,
    llama_attention_patched_by_axolotl,
    loss_and_gradients,
    randomize_adapters,
    relative_errors,
    tiny_llama,
    with_kernels,
)
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from axolotl_chainlora.kernels import axolotl_lora_parameters, chain_lora_parameters, use_chain_lora_parameters
from axolotl_chainlora.layer import ChainLoraLayer

# the relative Frobenius error of a gradient against float64; measured at most 2.6e-5 for the kernels and 4.8e-5
# for PEFT's own float32 path (random adapter tensors of std 0.3, so the rounding is not small); a gradient that
# misses the core or a tied link is off by O(1)
GRADIENT_TOLERANCE = 2e-4
LOSS_TOLERANCE = 1e-6  # relative; measured at most 1e-8 for both paths

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs Triton's interpreter, which tests/conftest.py turns on only without CUDA"
)


@pytest.fixture(scope="module")
def axolotl_kernels(tiny_llama_dir):
    """axolotl's kernel patches for Llama, with the lookup the kernels read A, B and s through; taken back after
    this module (they rewrite LlamaAttention.forward). Counts the kernels' calls, to show they ran."""
    state = {"lookup": chain_lora_parameters, "swiglu": 0, "chain": 0}

    def swiglu(gate, up):
        state["swiglu"] += 1
        return swiglu_forward_on_input_device(gate, up)

    def lora_parameters(proj):
        state["chain"] += isinstance(proj, ChainLoraLayer)
        return state["lookup"](proj)

    with llama_attention_patched_by_axolotl(tiny_llama_dir) as patch:
        patch.setattr(axolotl_swiglu, "swiglu_forward", swiglu)
        # axolotl 0.19 binds the name in its lora module at import
        patch.setattr(axolotl_lora, "swiglu_forward", swiglu, raising=False)
        use_chain_lora_parameters()
        assert axolotl_lora.get_lora_parameters is chain_lora_parameters
        patch.setattr(axolotl_lora, "get_lora_parameters", lora_parameters)
        yield state


def fused_loss_and_gradients(model, input_ids, state):
    """loss_and_gradients with axolotl's fused kernels patched in (checked to have run)."""
    fused = with_kernels(model, kernels=True)
    layer = fused.base_model.model.model.layers[0]
    assert layer.mlp.forward.__func__ is axolotl_lora.apply_lora_mlp_swiglu
    assert layer.self_attn.apply_qkv.__func__ is axolotl_lora.apply_lora_qkv
    assert layer.self_attn.apply_o.__func__ is axolotl_lora.apply_lora_o
    before = dict(state)
    result = loss_and_gradients(fused, input_ids)
    assert state["swiglu"] > before["swiglu"] and state["chain"] > before["chain"], "the kernels did not run"
    return result


def assert_kernels_exact(model, float64_model, input_ids, state) -> None:
    """The model with axolotl's kernels gives float64's loss and gradients within float32 rounding, as PEFT does."""
    reference_loss, reference = loss_and_gradients(with_kernels(float64_model, kernels=False), input_ids)
    peft_loss, peft_gradients = loss_and_gradients(with_kernels(copy.deepcopy(model), kernels=False), input_ids)
    fused_loss, fused_gradients = fused_loss_and_gradients(model, input_ids, state)

    assert fused_gradients.keys() == reference.keys()
    missing = [name for name, grad in fused_gradients.items() if grad is None]
    assert not missing, f"no gradient reached {missing}"
    for path, loss in (("kernels", fused_loss), ("PEFT", peft_loss)):
        assert abs(loss - reference_loss) < LOSS_TOLERANCE * reference_loss, (
            f"{path}: loss {loss}, float64 {reference_loss}"
        )
    errors = relative_errors(fused_gradients, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRADIENT_TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"
    assert max(relative_errors(peft_gradients, reference).values()) < GRADIENT_TOLERANCE


def kernel_model(chain_type: str, base=None, **overrides):
    """A chain adapter with random tensors on every projection of a tiny Llama, as axolotl builds it (a causal LM)."""
    return chain_model(chain_type, base=base, target_modules=PROJECTIONS, task_type="CAUSAL_LM", **overrides)


def float64_copy(model):
    return copy.deepcopy(model).double()


CHAIN_TYPES = ["linchain", "moslora", "mtlora_shim", "mtlora_icfm", "mtlora_ctcm", "mtlora_dtsm", "lora"]


@pytest.mark.parametrize("chain_type", CHAIN_TYPES)
def test_kernels_compute_every_chain_type(axolotl_kernels, input_ids, chain_type):
    model = kernel_model(chain_type)
    assert_kernels_exact(model, float64_copy(model), input_ids, axolotl_kernels)


def test_kernels_compute_a_fused_projection(axolotl_kernels, input_ids):
    # each output slice keeps its own B: B' = blockdiag(B_1, B_2)
    model = kernel_model("mtlora_ctcm", chain_fused_splits={"q_proj": 2, "up_proj": [40, 24]})
    assert_kernels_exact(model, float64_copy(model), input_ids, axolotl_kernels)


@pytest.mark.parametrize("into_base", [False, True], ids=["tied-beside-base", "tied-into-base"])
def test_kernels_compute_cola_tied_links(axolotl_kernels, input_ids, into_base):
    model = kernel_model("moslora")
    config = model.peft_config["default"]
    for layer in chain_layers(model).values():
        layer.tie_link("default", into_base=into_base)
        # a rank step-down: the new link has rank 2 beside the tied rank-4 link
        layer.start_new_link("default", config, 2, torch.Generator().manual_seed(5))
    randomize_adapters(model, seed=4)
    assert_kernels_exact(model, float64_copy(model), input_ids, axolotl_kernels)


def test_kernels_compute_a_chain_adapter_with_gradient_checkpointing(axolotl_kernels, input_ids):
    model = kernel_model("linchain")
    reference = float64_copy(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    assert_kernels_exact(model, reference, input_ids, axolotl_kernels)


def test_kernels_compute_a_chain_adapter_on_a_4bit_base(axolotl_kernels, input_ids, tiny_llama_dir):
    # NF4 without double quantization: bitsandbytes' double-quant dequantization needs a CUDA stream
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization, dtype=torch.float32)
    model = kernel_model("mtlora_icfm", base=base)
    assert_kernels_exact(model, dequantized_float64_copy(model), input_ids, axolotl_kernels)


def dequantized_float64_copy(model):
    """The 4-bit chain model in float64: the base's dequantized weights, the same adapter tensors."""
    base = tiny_llama().double()
    quantized = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, module in base.named_modules():
            layer = quantized.get(name)
            if isinstance(layer, ChainLoraLayer):
                weight = layer.get_base_layer().weight
                module.weight.copy_(dequantize_4bit(weight.data, weight.quant_state))
            elif isinstance(module, (torch.nn.Embedding, torch.nn.Linear)) or hasattr(module, "variance_epsilon"):
                module.weight.copy_(quantized[name].weight)
    reference = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(reference, {k: v.double() for k, v in get_peft_model_state_dict(model).items()})
    return reference


@pytest.mark.parametrize("chain_type", ["linchain", "lora"])
def test_stock_lookup_is_caught(axolotl_kernels, input_ids, chain_type):
    """Negative control: axolotl's own get_lora_parameters reads A and B only. On a chain adapter the loss is off
    and the core gets no gradient; on tied links beside the base (chain_type lora, COLA) the loss is off."""
    model = kernel_model(chain_type)
    if chain_type == "lora":
        for layer in chain_layers(model).values():
            layer.tie_link("default", into_base=False)
        randomize_adapters(model, seed=4)
    reference_loss, _ = loss_and_gradients(with_kernels(float64_copy(model), kernels=False), input_ids)
    axolotl_kernels["lookup"] = axolotl_lora_parameters
    try:
        loss, gradients = fused_loss_and_gradients(copy.deepcopy(model), input_ids, axolotl_kernels)
        with pytest.raises(
            AssertionError, match="no gradient reached" if chain_type == "linchain" else "kernels: loss"
        ):
            assert_kernels_exact(model, float64_copy(model), input_ids, axolotl_kernels)
    finally:
        axolotl_kernels["lookup"] = chain_lora_parameters
    assert abs(loss - reference_loss) > 1e-3
    cores = [name for name in gradients if "lora_core" in name]
    assert len(cores) == (0 if chain_type == "lora" else 2 * len(PROJECTIONS) * len(LINCHAIN_DIMS[1:]))
    assert all(gradients[name] is None for name in cores)


def test_tied_links_beside_the_base_with_dropout_are_refused_at_the_first_forward():
    # the config validation refuses this (lora_kernels_obstacle); here ColaCallback decided otherwise than predicted
    model = kernel_model("moslora", lora_dropout=0.1)
    layer = next(iter(chain_layers(model).values()))
    layer.tie_link("default", into_base=False)
    with pytest.raises(RuntimeError, match="would drop out the tied links' input too. Set lora_dropout: 0"):
        chain_lora_parameters(layer)
