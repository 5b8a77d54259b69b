"""axolotl's fused LoRA kernels (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`) on chain adapters.

A chain adapter is exactly a LoRA whose A is A' = T A: s B T A x = s B (T A) x. axolotl's kernel
autograd Functions (`LoRA_MLP`, `LoRA_QKV`, `LoRA_O` in `axolotl.kernels.lora`) read A, B and s through
`get_lora_parameters`, looked up by module-global name at call time, never write A or B, and return
A's gradient as an ordinary backward output. So a `get_lora_parameters` that returns A' = T A (made
in forward, r^2 d FLOPs) lets the kernels compute the chain adapter, and autograd carries the
gradient of A' on to T and A. COLA's tied links kept beside the base ride along, stacked in front
(`ChainLoraLayer.kernel_factors`).

Without this, axolotl's patcher, which accepts any module with `lora_A`, would train plain B A x.
"""

from __future__ import annotations

import sys
import types

import axolotl.kernels.lora as axolotl_lora

from .layer import ChainLoraLayer

# axolotl's own lookup, which this module wraps
axolotl_lora_parameters = axolotl_lora.get_lora_parameters


def chain_lora_parameters(proj):
    """axolotl's `get_lora_parameters`, with A, B, s of a chain layer's adapter as one plain LoRA."""
    parameters = axolotl_lora_parameters(proj)
    A = parameters[3]
    if A is None or not isinstance(proj, ChainLoraLayer):
        return parameters  # a base layer, a disabled or merged adapter, or plain PEFT LoRA
    adapter = proj.active_adapters[0]
    if adapter not in proj.lora_core:
        return parameters  # a plain LoraConfig adapter on a chain layer
    W, bias, quant_state, _, _, _, lora_bias, dropout, magnitude = parameters
    A, B, scaling = proj.kernel_factors(adapter)
    return W, bias, quant_state, A, B, scaling, lora_bias, dropout, magnitude


def use_chain_lora_parameters() -> None:
    """Make axolotl's LoRA kernels read chain adapters through `chain_lora_parameters`: in axolotl.kernels.lora,
    and in the axolotl modules imported so far that bound its name (integrations' kernels, e.g. DeepSeek-V4's);
    later imports bind the replacement."""
    for module in _axolotl_modules():
        if getattr(module, "get_lora_parameters", None) is axolotl_lora_parameters:
            module.get_lora_parameters = chain_lora_parameters


def kernels_read_chain_adapters() -> bool:
    """Whether every axolotl module that holds a get_lora_parameters holds `chain_lora_parameters`."""
    return all(
        getattr(module, "get_lora_parameters", chain_lora_parameters) is chain_lora_parameters
        for module in _axolotl_modules()
    )


def _axolotl_modules() -> list[types.ModuleType]:
    return [module for name, module in list(sys.modules.items()) if name.startswith("axolotl.") and module]
