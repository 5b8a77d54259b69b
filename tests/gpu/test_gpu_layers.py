"""In process on the GPU: axolotl's LoRA kernels (real Triton) against the unfused chain layers, and a COLA knot.

The CPU suite proves the kernels exact under Triton's interpreter (tests/unit/test_kernels.py); here the same
comparison runs on CUDA in float32 (against float64) and in bf16 (against the unfused bf16 path). The knot
leaves the logits as they were (the new link starts at B = 0) on a 4-bit and a bf16 base.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from helpers import (
    PROJECTIONS,
    chain_layers,
    chain_model,
    llama_attention_patched_by_axolotl,
    loss_and_gradients,
    make_input_ids,
    measured,
    randomize_adapters,
    relative_errors,
    with_kernels,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from axolotl_chainlora.kernels import use_chain_lora_parameters

# float32 on CUDA: as the CPU suite's bound (no TF32 for matmuls: torch's default)
FLOAT32_TOLERANCE = 2e-4
BF16_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def axolotl_kernels(tiny_llama_dir):
    with llama_attention_patched_by_axolotl(tiny_llama_dir):
        use_chain_lora_parameters()
        yield


@pytest.mark.parametrize("chain_type", ["linchain", "moslora", "mtlora_icfm", "mtlora_dtsm", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_kernels_on_cuda_train_as_the_unfused_layers(axolotl_kernels, chain_type, dtype):
    model = chain_model(chain_type, target_modules=PROJECTIONS, task_type="CAUSAL_LM").to("cuda")
    if chain_type == "lora":  # COLA's tied links beside the base, then a new link
        for layer in chain_layers(model).values():
            layer.tie_link("default", into_base=False)
        randomize_adapters(model, seed=4)
    input_ids = make_input_ids().cuda()
    reference = copy.deepcopy(model).to(torch.float64 if dtype == torch.float32 else dtype)
    reference_loss, reference_gradients = loss_and_gradients(with_kernels(reference, kernels=False), input_ids)
    loss, gradients = loss_and_gradients(with_kernels(model.to(dtype), kernels=True), input_ids)
    error = max(relative_errors(gradients, reference_gradients).values())
    measured(f"kernels on CUDA, {chain_type} {dtype}: worst gradient error", error)
    measured(f"kernels on CUDA, {chain_type} {dtype}: loss error", abs(loss - reference_loss) / reference_loss)
    assert error < (FLOAT32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE)


@pytest.mark.parametrize("quantized", [True, False], ids=["4bit-frozen", "bf16-frozen"])
def test_a_knot_on_cuda_leaves_the_logits(tiny_llama_dir, quantized):
    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, device_map={"": "cuda"}, **kwargs)
    model = chain_model("linchain", base=base, target_modules=PROJECTIONS)
    config = model.peft_config["default"]
    input_ids = make_input_ids().cuda()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits.float()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for layer in chain_layers(model).values():
            layer.tie_link("default", into_base=False)
            layer.start_new_link("default", config, config.r, torch.Generator().manual_seed(1))
        torch.cuda.synchronize()
        knot_seconds = time.perf_counter() - started
        after = model(input_ids=input_ids).logits.float()
    diff = (after - before).abs().max().item()
    measured(f"knot on a {'4-bit' if quantized else 'bf16'} base: logits max abs change", diff)
    measured(f"knot on a {'4-bit' if quantized else 'bf16'} base: seconds (tiny model)", knot_seconds)
    assert diff < 0.05 * before.abs().max().item()
