"""axolotl's SwiGLU forward for CPU tensors, under Triton's interpreter.

axolotl's `swiglu_forward` allocates its output on "cuda"; this one allocates where its input is and launches
axolotl's own Triton kernel. Used by sitecustomize.py (the `axolotl` runs of tests/e2e) and by the in-process
kernel tests (tests/unit/test_kernels.py).
"""

from __future__ import annotations

import torch
import triton
from axolotl.kernels import swiglu


def swiglu_forward_on_input_device(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n_elements = gate.numel()
    swiglu._swiglu_fwd_kernel[(triton.cdiv(n_elements, 1024),)](gate, up, out, n_elements, block_size=1024)
    return out
