"""axolotl's LoRA kernels on the CPU, for the `axolotl` runs of tests/e2e/test_axolotl_kernels.py.

That test puts this folder on PYTHONPATH, so every Python process of those runs imports this module at
start-up. Triton's interpreter (TRITON_INTERPRET, set before Triton loads) runs axolotl's Triton SwiGLU
kernel on CPU tensors; axolotl's `swiglu_forward` allocates its output on "cuda", so it is replaced, as
soon as `axolotl.kernels.swiglu` is imported, by cpu_swiglu's.

The negative control: a config named stock-lookup*.yml gets axolotl's own `get_lora_parameters` back
just before axolotl patches its kernels in, as another integration replacing it would.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _allocate_on_input_device(swiglu) -> None:
    from cpu_swiglu import swiglu_forward_on_input_device  # beside this module: imports axolotl, so not at start-up

    swiglu.swiglu_forward = swiglu_forward_on_input_device


def _stock_lookup_before_patching(lora_kernels) -> None:
    import axolotl.kernels.lora as axolotl_lora

    stock = axolotl_lora.get_lora_parameters  # imported before any plugin could replace it
    apply_lora_kernel_patches = lora_kernels.apply_lora_kernel_patches

    def apply_with_stock_lookup(*args, **kwargs):
        axolotl_lora.get_lora_parameters = stock
        return apply_lora_kernel_patches(*args, **kwargs)

    lora_kernels.apply_lora_kernel_patches = apply_with_stock_lookup


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs patches[name](module) right after module `name` is first imported."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_patches = {"axolotl.kernels.swiglu": _allocate_on_input_device}
if any(os.path.basename(arg).startswith("stock-lookup") for arg in sys.argv):
    _patches["axolotl.monkeypatch.lora_kernels"] = _stock_lookup_before_patching
sys.meta_path.insert(0, _PatchAfterImport(_patches))
