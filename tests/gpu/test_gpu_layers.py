"""In process on the GPU: axolotl's LoRA kernels (real Triton) against the unfused chain layers, and a COLA knot.

The CPU suite proves the kernels exact under Triton's interpreter (tests/unit/test_kernels.py); here the same
comparison runs on CUDA in float32 (against float64) and in bf16 (against the unfused bf16 path). The knot
leaves the logits as they were (the new link starts at B = 0) on a 4-bit and a bf16 base.
"""

from __future__ import annotations

import copy
import time

import axolotl.kernels.lora as axolotl_lora
import pytest
import torch
import torch.nn.functional as F
from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches, patch_self_attn_lora
from axolotl.utils.dict import DictDefault
from helpers import chain_layers, chain_model, make_input_ids, randomize_adapters
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from axolotl_chainlora.kernels import use_chain_lora_parameters

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KERNELS = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}
# float32 on CUDA: as the CPU suite's bound (no TF32 for matmuls: torch's default)
FLOAT32_TOLERANCE = 2e-4
BF16_TOLERANCE = 5e-2


def measured(what: str, value: float) -> None:
    print(f"MEASURED {what}: {value:.3e}")


@pytest.fixture(scope="module")
def axolotl_kernels(tiny_llama_dir):
    original_forward = LlamaAttention.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(axolotl_lora, "get_lora_parameters", axolotl_lora.get_lora_parameters)
        patch_self_attn_lora(DictDefault(base_model=tiny_llama_dir, model_config_type="llama", **KERNELS))
        use_chain_lora_parameters()
        yield
    LlamaAttention.forward = original_forward
    del LlamaAttention._original_forward


def loss_and_gradients(model, input_ids, kernels: bool):
    apply_lora_kernel_patches(model, DictDefault(model_config_type="llama", **(KERNELS if kernels else {})))
    model.train()
    logits = model(input_ids=input_ids).logits.double()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), {name: p.grad.double() for name, p in model.named_parameters() if p.requires_grad}


def worst_relative_error(gradients, reference) -> float:
    return max(((gradients[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference)


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
    reference_loss, reference_gradients = loss_and_gradients(reference, input_ids, kernels=False)
    loss, gradients = loss_and_gradients(model.to(dtype), input_ids, kernels=True)
    error = worst_relative_error(gradients, reference_gradients)
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
