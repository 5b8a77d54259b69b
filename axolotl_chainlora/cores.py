"""The cores: the small learnable matrix T that sits between LoRA's A and B.

Every adapter here computes delta_W = s * B @ T @ A (Hu et al., LoRA, arXiv:2106.09685, with T = I):
- MoSLoRA (Wu, Wang, Zhao, Wong, "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv:2406.11909):
  T = M, one learnable r x r mixer;
- LinChain (Wang, Zuo, Xuan, Li, Wei, "Linear Chain Transformation: Expanding Optimization Dynamics
  for Fine-Tuning Large Language Models", arXiv:2411.00039): T = W1 @ W2 @ ... @ Wn, a chain of n
  factors W_i of shape d_{i-1} x d_i with d0 = dn = r;
- MTLoRA (Liang, Wang, Li, Zeng, "Matrix-Transformation Based Low-Rank Adaptation", arXiv:2403.07440):
  SHIM T = C, ICFM T = C @ C^T, CTCM T = C @ D, DTSM T = C + D.

Math only, no PEFT: this module builds T for each method, counts its parameters and initialises it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

CHAIN_TYPES = (
    "lora",  # no core (T = I): plain LoRA in the chain layers, for COLA on plain LoRA
    "moslora",  # Wu et al. 2024: one r x r mixer M
    "linchain",  # LinChain: T = W1 @ W2 @ ... @ Wn, n factors
    "mtlora_shim",  # MTLoRA: T = C
    "mtlora_icfm",  # MTLoRA: T = C @ C^T
    "mtlora_ctcm",  # MTLoRA: T = C @ D
    "mtlora_dtsm",  # MTLoRA: T = C + D
)
CHAIN_INITS = ("kaiming", "identity", "orthogonal")
DEFAULT_LINCHAIN_FACTORS = 3


def default_chain_dims(r: int) -> list[int]:
    """LinChain-3-r, the LinChain paper's default: three r x r factors."""
    return [r] * (DEFAULT_LINCHAIN_FACTORS + 1)


def core_shapes(chain_type: str, r: int, chain_dims: list[int] | None = None) -> list[tuple[int, int]]:
    """Shapes of the core's parameters, in the order they are named weight, weight_1, ..."""
    if chain_type == "lora":
        return []
    if chain_type == "linchain":
        dims = chain_dims or default_chain_dims(r)
        return [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
    if chain_type in ("moslora", "mtlora_shim", "mtlora_icfm"):
        return [(r, r)]
    if chain_type in ("mtlora_ctcm", "mtlora_dtsm"):
        return [(r, r), (r, r)]
    raise ValueError(f"chain_type={chain_type!r} is not one of {CHAIN_TYPES}.")


def core_parameter_count(chain_type: str, r: int, chain_dims: list[int] | None = None) -> int:
    """Extra parameters per adapted layer on top of LoRA's (d_in + d_out) * r."""
    return sum(rows * cols for rows, cols in core_shapes(chain_type, r, chain_dims))


@torch.no_grad()
def draw_into(tensor: torch.Tensor, init_fn, generator: torch.Generator | None = None) -> None:
    """Fill `tensor` with `init_fn`'s draw, made in float32 on the CPU (where `generator` lives) and copied over."""
    draw = torch.empty(tensor.shape, dtype=torch.float32)
    if generator is None:
        init_fn(draw)
    else:
        init_fn(draw, generator=generator)
    tensor.copy_(draw)


@torch.no_grad()
def draw_factors(chain_type: str, factors: list[torch.Tensor], init: str, generator: torch.Generator | None = None):
    """Draw a core's factors in place, in order: `chain_init`'s draw (a CPU `generator` makes it the same on every
    data-parallel rank)."""
    if init not in CHAIN_INITS:
        raise ValueError(f"chain_init={init!r} is not one of {CHAIN_INITS}.")
    for index, factor in enumerate(factors):
        if init == "kaiming":
            # the papers' default, the same draw as nn.Linear and LoRA's A
            draw_into(factor, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)), generator)
        elif chain_type == "mtlora_dtsm" and index == 1:
            # DTSM keeps D = 0 so that C + D = C
            factor.zero_()
        elif init == "identity":
            # T = I, so training starts as exact LoRA
            nn.init.eye_(factor)
        else:
            draw_into(factor, nn.init.orthogonal_, generator)


class ChainCore(nn.Module):
    """T for one adapter of one layer, applied to the r-dim activations between A and B.

    A leaf module whose parameters are plain `weight`, `weight_1`, ...: FSDP wrapping and
    DeepSpeed ZeRO-3 gathering hook module calls, so training computes T inside forward.
    """

    def __init__(self, chain_type: str, r: int, chain_dims: list[int] | None = None, init: str = "kaiming"):
        super().__init__()
        self.chain_type = chain_type
        self.r = r
        self.param_names = []
        for index, shape in enumerate(core_shapes(chain_type, r, chain_dims)):
            name = "weight" if index == 0 else f"weight_{index}"
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            self.param_names.append(name)
        self.reset_parameters(init)

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.param_names]

    @torch.no_grad()
    def reset_parameters(self, init: str, generator: torch.Generator | None = None) -> None:
        """Draw the factors; `generator` (a CPU one) makes the draw the same on every data-parallel rank."""
        draw_factors(self.chain_type, self.factors(), init, generator)

    def times(self, A: torch.Tensor) -> torch.Tensor:
        """T @ A, in A's dtype."""
        return self.matrix().to(A.dtype) @ A if self.param_names else A

    def matrix(self) -> torch.Tensor:
        """T itself (r x r). Outside forward (merge, export) the caller gathers sharded parameters first,
        as for PEFT's own A and B."""
        factors = self.factors()
        if self.chain_type == "mtlora_icfm":
            return factors[0] @ factors[0].T
        if self.chain_type == "mtlora_dtsm":
            return factors[0] + factors[1]
        return torch.linalg.multi_dot(factors) if len(factors) > 1 else factors[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # one r x r matmul on the activations, however many factors the chain has
        return F.linear(hidden, self.matrix()) if self.param_names else hidden

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, f.shape)) for f in self.factors())
        return f"chain_type={self.chain_type}, factors=[{shapes}]"
