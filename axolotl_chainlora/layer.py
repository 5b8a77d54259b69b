"""PEFT LoRA layers with a core: y = W0 x + s * B T A dropout(x).

The core is a LoRA variant in PEFT's sense (`ChainVariant`): PEFT's own Linear,
Linear4bit and Linear8bitLt then run forward, merge, unmerge, disable and mixed
batches through it. `ChainLoraLayer` adds what the variant API does not cover:
the delta weight (merge, PEFT's SVD conversion), fused q/k/v splits and a strict check
of loaded tensors.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn

from .cores import ChainCore, core_shapes, draw_factors, draw_into

if TYPE_CHECKING:
    from .config import ChainLoraConfig


class FusedLoraB(nn.Module):
    """B of a fused projection (q, k, v in one matrix): blockdiag(B_1, ..., B_k).

    `weight` stacks the k blocks (out x r), the same shape as LoRA's B; block g maps
    slice g of the k*r hidden units to output slice g.
    """

    def __init__(self, r: int, split_sizes: list[int]):
        super().__init__()
        self.r = r
        self.split_sizes = split_sizes
        self.weight = nn.Parameter(torch.empty(sum(split_sizes), r))
        # as nn.Linear(bias=False) has it: readers of LoRA's B (axolotl's kernels) look for it
        self.register_parameter("bias", None)

    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self.weight.split(self.split_sizes, dim=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slices = hidden.split(self.r, dim=-1)
        return torch.cat([F.linear(h, block) for h, block in zip(slices, self.blocks())], dim=-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, split_sizes={self.split_sizes}"


class ChainVariant(LoraVariant):
    """The core as a PEFT LoRA variant; all math lives on the layer."""

    @staticmethod
    def init(module: ChainLoraLayer, adapter_name: str, config: ChainLoraConfig, **kwargs) -> None:
        module.add_chain_core(adapter_name, config, kwargs.get("target_name") or module.module_key)

    @staticmethod
    def merge_safe(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: ChainLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: ChainLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        hidden = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        update = module.lora_B[active_adapter](module.lora_core[active_adapter](hidden))
        result = result + update * module.scaling[active_adapter]
        if module.adds_tied_links(active_adapter):
            # links COLA tied act as part of the base: no dropout, already scaled
            result = result + module.lora_tied_B[active_adapter](module.lora_tied_A[active_adapter](x))
        return result


class TiedFactor(nn.Module):
    """One factor of the links COLA tied into an adapter, stacked oldest first: a frozen buffer `weight`.

    A buffer, not a parameter: PEFT's set_adapter turns requires_grad on for every adapter parameter.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers are not cast by DeepSpeed's bf16 or FSDP2's mixed precision
        return F.linear(x, self.weight.to(x.dtype))


def link_factors(
    core: ChainCore, A: torch.Tensor, B: torch.Tensor, scaling: float, split_sizes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One link's update s * B T A as two factors (B', A') with B' A' = s B T A, in A's dtype:
    A' = T A, B' = s B (s blockdiag(B_1..B_k) for a fused projection)."""
    B = torch.block_diag(*B.split(split_sizes, dim=0)) if split_sizes else B
    return B.to(A.dtype) * scaling, core.times(A)


def draw_A(A: torch.Tensor, r: int, init_lora_weights, generator: torch.Generator | None = None) -> None:
    """The draw PEFT's reset_lora_parameters makes for a rank-r A."""
    if init_lora_weights == "gaussian":
        draw_into(A, functools.partial(nn.init.normal_, std=1 / r), generator)
    else:
        draw_into(A, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)), generator)


class ChainLoraLayer:
    """Mixin put before a PEFT LoRA layer class in the MRO."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_core", "lora_tied_A", "lora_tied_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs):
        # PEFT's bnb layers call update_layer without the module's name; fused splits match on it
        self.module_key = kwargs.get("target_name", "")
        # adapters whose tied links (COLA, cola_merge: base) were added into the base weight
        self.tied_in_base: set[str] = set()
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._register_load_state_dict_pre_hook(_refuse_incomplete_adapter_tensors, with_module=True)

    def resolve_lora_variant(self, *, config, **kwargs):
        # a ChainLoraConfig: config.py builds on this module, so it is known by its chain_type field
        if getattr(config, "chain_type", None) is not None:
            return ChainVariant()
        # a plain LoraConfig adapter added to this layer stays plain LoRA
        return super().resolve_lora_variant(config=config, **kwargs)

    def add_chain_core(self, adapter_name: str, config: ChainLoraConfig, module_key: str) -> None:
        for layer_name in ("lora_core", "lora_tied_A", "lora_tied_B"):
            if layer_name not in self._modules:
                setattr(self, layer_name, nn.ModuleDict())
        split_sizes = config.fused_split_sizes(module_key, self.out_features)
        self._build_link(adapter_name, config, self.r[adapter_name], split_sizes)
        if split_sizes:
            self._draw_link(adapter_name, config.init_lora_weights)
        if config.cola_tied_ranks:
            # placeholders: a saved adapter's tied factors set their size when they load
            self.lora_tied_A[adapter_name] = TiedFactor(torch.zeros(0, self.in_features))
            self.lora_tied_B[adapter_name] = TiedFactor(torch.zeros(self.out_features, 0))
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _build_link(self, adapter_name: str, config: ChainLoraConfig, r: int, split_sizes: list[int] | None) -> None:
        """The core; and A and B where PEFT's own do not fit: a fused projection gives each of its k output
        slices its own rank-r B, sharing one k*r-dim A."""
        core_r = r * len(split_sizes) if split_sizes else r
        if split_sizes:
            self.lora_A[adapter_name] = nn.Linear(self.in_features, core_r, bias=False)
            self.lora_B[adapter_name] = (
                FusedLoraB(r, split_sizes) if split_sizes else nn.Linear(r, self.out_features, bias=False)
            )
        # ChainLoraConfig allows chain_dims for linchain only
        self.lora_core[adapter_name] = ChainCore(config.chain_type, core_r, config.chain_dims, config.chain_init)

    @torch.no_grad()
    def _draw_link(self, adapter_name: str, init_lora_weights) -> None:
        """The draws PEFT's reset_lora_parameters makes for A and B."""
        draw_A(self.lora_A[adapter_name].weight, self.r[adapter_name], init_lora_weights)
        if init_lora_weights:
            self.lora_B[adapter_name].weight.zero_()
        else:
            draw_into(self.lora_B[adapter_name].weight, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))

    def link_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The current link's update as (B', A'), B' A' = s B T A, in float32, at the link's own rank."""
        lora_B = self.lora_B[adapter]
        split_sizes = lora_B.split_sizes if isinstance(lora_B, FusedLoraB) else None
        A = self.lora_A[adapter].weight.float()
        B, A = link_factors(self.lora_core[adapter], A, lora_B.weight, self.scaling[adapter], split_sizes)
        positions = self.link_positions(adapter)
        return (B, A) if positions is None else (B[:, positions], A[positions])

    # ---- COLA's rank step-down: a link of rank r zero-padded in tensors of the first link's rank

    def storage_rank(self, adapter: str) -> int:
        """The rank the link's tensors have (read from the modules: a ZeRO-3 parameter has no shape)."""
        lora_B = self.lora_B[adapter]
        return lora_B.r if isinstance(lora_B, FusedLoraB) else lora_B.in_features

    def fused_slices(self, adapter: str) -> int:
        """k, the output slices of a fused projection (q, k, v), each with its own B; 1 otherwise."""
        lora_B = self.lora_B[adapter]
        return len(lora_B.split_sizes) if isinstance(lora_B, FusedLoraB) else 1

    def link_positions(self, adapter: str, r: int | None = None) -> torch.Tensor | None:
        """Where a link of rank r (default the current link's) sits among the k*R rows of A and of the core:
        the first r of each fused slice's R. None when it fills them."""
        r, storage = r or self.r[adapter], self.storage_rank(adapter)
        if r == storage:
            return None
        return torch.cat([torch.arange(r) + index * storage for index in range(self.fused_slices(adapter))])

    def trim_link_tensor(self, adapter: str, layer_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A link tensor as a link of its own rank has it: the padding cut away (A's rows, B's columns, the
        core's rows and columns); tied factors and unpadded links as they are."""
        positions = self.link_positions(adapter)
        if positions is None or layer_name not in ("lora_A", "lora_B", "lora_core"):
            return tensor
        if layer_name == "lora_A":
            return tensor[positions]
        if layer_name == "lora_B":
            return tensor[:, : self.r[adapter]]
        return tensor[positions][:, positions]

    def pad_link_tensor(self, adapter: str, layer_name: str, tensor: torch.Tensor, r: int) -> torch.Tensor:
        """A rank-r link tensor embedded in this layer's tensors, zero elsewhere (the inverse of trimming)."""
        positions = self.link_positions(adapter, r)
        storage = self.fused_slices(adapter) * self.storage_rank(adapter)
        if layer_name == "lora_A":
            padded = tensor.new_zeros(storage, tensor.shape[1])
            padded[positions] = tensor
        elif layer_name == "lora_B":
            padded = tensor.new_zeros(tensor.shape[0], self.storage_rank(adapter))
            padded[:, :r] = tensor
        else:
            padded = tensor.new_zeros(storage, storage)
            padded[positions.unsqueeze(1), positions] = tensor
        return padded

    def kernel_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The adapter as one plain LoRA (A', B', s), for kernels that compute s * B' A' dropout(x).

        A' = T A and B' = B (blockdiag(B_1..B_k) for a fused projection), in the adapter's dtype and
        differentiable: autograd carries A''s gradient on to T and A. Tied links kept beside the base are
        stacked in front, A'' = [A_tied; A'], B'' = [B_tied / s, B'], since their factors are scaled already.
        """
        lora_B = self.lora_B[adapter]
        split_sizes = lora_B.split_sizes if isinstance(lora_B, FusedLoraB) else None
        B, A = link_factors(self.lora_core[adapter], self.lora_A[adapter].weight, lora_B.weight, 1.0, split_sizes)
        scaling = self.scaling[adapter]
        if self.adds_tied_links(adapter):
            if not isinstance(self.lora_dropout[adapter], nn.Identity):
                raise RuntimeError(
                    f"adapter '{adapter}' has COLA's tied links beside the base and lora_dropout: the LoRA kernels "
                    "would drop out the tied links' input too. Set lora_dropout: 0, or turn the lora_*_kernel keys off."
                )
            A = torch.cat([self.lora_tied_A[adapter].weight.to(A.dtype), A])
            B = torch.cat([self.lora_tied_B[adapter].weight.to(B.dtype) / scaling, B], dim=1)
        return A, B, scaling

    def adds_tied_links(self, adapter: str) -> bool:
        """Whether forward and the delta weight add the adapter's tied links (not when they are in the base)."""
        return adapter in self.lora_tied_A and adapter not in self.tied_in_base

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B T A (plus the tied links) in the base weight's layout, computed in float32.

        Reads the factors directly, as PEFT's own LoRA layers do: under ZeRO-3 the
        caller gathers them first.
        """
        if adapter not in self.lora_core:
            return super().get_delta_weight(adapter)
        B, A = self.link_factors(adapter)
        delta = B @ A
        if self.adds_tied_links(adapter):
            delta = delta + self.lora_tied_B[adapter].weight.float() @ self.lora_tied_A[adapter].weight.float()
        return transpose(delta, self.fan_in_fan_out).to(self.lora_B[adapter].weight.dtype)

    # ---- Chain of LoRA (COLA): tie a knot, start a new link

    @torch.no_grad()
    def tie_link(self, adapter: str, into_base: bool) -> float:
        """Append the current link's update to the tied links, and add it to the base weight when `into_base`.
        Returns the squared Frobenius norm of the tied update."""
        if not into_base and adapter in self.tied_in_base:
            raise ValueError(
                f"The tied links of adapter '{adapter}' are in the base weight: tie the next one there too."
            )
        B, A = self.link_factors(adapter)
        dtype = self.lora_A[adapter].weight.dtype
        # copies: A' = A itself when there is no core, and the new link is drawn into A in place
        A, B = A.to(dtype, copy=True), B.to(dtype, copy=True)
        rows = 0
        if adapter in self.lora_tied_A:
            rows = self.lora_tied_A[adapter].weight.shape[0]
            A = torch.cat([self.lora_tied_A[adapter].weight, A], dim=0)
            B = torch.cat([self.lora_tied_B[adapter].weight, B], dim=1)
        self.lora_tied_A[adapter] = TiedFactor(A)
        self.lora_tied_B[adapter] = TiedFactor(B)
        if into_base:
            # earlier links kept beside the base go in with this one
            self.add_tied_to_base(adapter, rows if adapter in self.tied_in_base else 0)
        new_B, new_A = B[:, rows:].double(), A[rows:].double()
        # ||B A||_F^2 = <B^T B, A A^T>: two small products instead of the out x in matrix
        return (new_B.T @ new_B * (new_A @ new_A.T)).sum().item()

    @torch.no_grad()
    def add_tied_to_base(self, adapter: str, start: int = 0) -> None:
        """Add the tied links from row `start` on into the float base weight, one link at a time (a knot and
        a resume from a checkpoint then round alike) and mark the adapter's tied links as in the base."""
        if adapter in self.lora_tied_A and start < self.lora_tied_A[adapter].weight.shape[0]:
            weight = self.get_base_layer().weight
            A = self.lora_tied_A[adapter].weight[start:].float()
            B = self.lora_tied_B[adapter].weight[:, start:].float()
            # in float32 at least, rounded once into the base dtype
            summed = weight.to(torch.promote_types(weight.dtype, torch.float32)) + transpose(B @ A, self.fan_in_fan_out)
            weight.copy_(summed)
        self.tied_in_base.add(adapter)

    @torch.no_grad()
    def start_new_link(self, adapter: str, config: ChainLoraConfig, r: int, generator: torch.Generator) -> None:
        """A fresh link in place, drawn as the first one was (B = 0). A link of a lower rank r (COLA's rank
        step-down) is drawn as a rank-r link and zero-padded into the tensors, whose shapes never change (the
        engines shard and track them): the padding gets zero gradients and stays zero under Adam and weight
        decay, so the link trains as a rank-r link."""
        if r > self.storage_rank(adapter):
            raise ValueError(
                f"cola_ranks: a link of rank {r} cannot follow links of rank {self.storage_rank(adapter)}: "
                "the ranks may only step down."
            )
        slices = self.fused_slices(adapter)
        core = self.lora_core[adapter]
        padded = r != self.storage_rank(adapter)
        if padded and core.param_names and config.chain_dims:
            raise ValueError("cola_ranks cannot step the rank down for chain_dims, which fix the rank of the chain.")
        self.set_link_rank(adapter, r)
        # the draw of a rank-r link: A, then the core's factors, in float32 on the CPU
        A = torch.empty(slices * r, self.in_features)
        draw_A(A, r, config.init_lora_weights, generator)
        shapes = core_shapes(config.chain_type, slices * r) if padded else [tuple(f.shape) for f in core.factors()]
        factors = [torch.empty(shape) for shape in shapes]
        draw_factors(config.chain_type, factors, config.chain_init, generator)
        self.lora_B[adapter].weight.zero_()
        for layer_name, params, draws in (("lora_A", [self.lora_A[adapter].weight], [A]),
                                          ("lora_core", core.factors(), factors)):  # fmt: skip
            for param, draw in zip(params, draws):
                param.copy_(self.pad_link_tensor(adapter, layer_name, draw, r) if padded else draw)

    def set_link_rank(self, adapter: str, r: int) -> None:
        """The current link's rank and the scale that goes with it (alpha / r, rsLoRA alpha / sqrt(r))."""
        self.r[adapter] = r
        alpha = self.lora_alpha[adapter]
        self.scaling[adapter] = alpha / math.sqrt(r) if self.use_rslora[adapter] else alpha / r


def _refuse_incomplete_adapter_tensors(module, state_dict, prefix, *args) -> None:
    """Refuse an adapter file whose tensors do not match this layer's adapters (a core missing, a link too many).

    PEFT only warns about such files and keeps the freshly drawn tensors: a silently wrong adapter.
    Names look like 'lora_A.default.weight': adapter-layer name, adapter name, tensor.
    """
    _size_tied_factors_to_saved(module, state_dict, prefix)
    _pad_saved_link(module, state_dict, prefix)
    layer_names = module.adapter_layer_names
    own: dict[str, set[str]] = {}
    for layer_name in layer_names:
        for key in getattr(module, layer_name, nn.ModuleDict()).state_dict():
            own.setdefault(key.split(".")[0], set()).add(f"{layer_name}.{key}")
    loaded: dict[str, set[str]] = {}
    unexpected = []
    for key in state_dict:
        name = key[len(prefix) :]
        parts = name.split(".")
        if not key.startswith(prefix) or parts[0] not in layer_names:
            continue
        if len(parts) > 1 and parts[1] in own:
            loaded.setdefault(parts[1], set()).add(name)
        else:
            unexpected.append(name)
    missing = []
    for adapter, names in loaded.items():
        missing += sorted(own[adapter] - names)
        unexpected += sorted(names - own[adapter])
    if missing or unexpected:
        raise ValueError(
            f"The adapter tensors loaded into module '{prefix.rstrip('.')}' do not match its config: "
            f"missing {missing}, unexpected {unexpected}. The adapter file and its adapter_config.json "
            "(chain_type, chain_dims, chain_fused_splits) disagree; it may be damaged or written by another "
            "version of axolotl-chainlora."
        )


def _pad_saved_link(module, state_dict, prefix) -> None:
    """A COLA link saved after a rank step-down (at its own rank) loads zero-padded into tensors of the first
    link's rank, as training holds it (and as the checkpoint's optimizer state has it)."""
    for adapter in getattr(module, "lora_tied_A", {}):
        B = state_dict.get(f"{prefix}lora_B.{adapter}.weight")
        if B is None or B.dim() != 2 or not B.shape[1] < module.storage_rank(adapter):
            continue
        r = B.shape[1]
        for key in list(state_dict):
            parts = key[len(prefix) :].split(".")
            if key.startswith(prefix) and parts[0] in ("lora_A", "lora_B", "lora_core") and parts[1:2] == [adapter]:
                state_dict[key] = module.pad_link_tensor(adapter, parts[0], state_dict[key], r)
        module.set_link_rank(adapter, r)


def _size_tied_factors_to_saved(module, state_dict, prefix) -> None:
    """Tied-link placeholders take the size of the saved factors (the sum of the tied links' ranks)."""
    for adapter in getattr(module, "lora_tied_A", {}):
        A = state_dict.get(f"{prefix}lora_tied_A.{adapter}.weight")
        B = state_dict.get(f"{prefix}lora_tied_B.{adapter}.weight")
        if A is None or B is None:
            continue  # named as missing below
        if not (A.dim() == B.dim() == 2 and A.shape[0] == B.shape[1]) or (B.shape[0], A.shape[1]) != (
            module.out_features,
            module.in_features,
        ):
            raise ValueError(
                f"The tied COLA links of module '{prefix.rstrip('.')}' have shapes A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}; this layer needs A (R, {module.in_features}) and B ({module.out_features}, R). "
                "The adapter file does not belong to this model or is damaged."
            )
        like = module.lora_A[adapter].weight
        module.lora_tied_A[adapter] = TiedFactor(torch.empty(A.shape, dtype=like.dtype, device=like.device))
        module.lora_tied_B[adapter] = TiedFactor(torch.empty(B.shape, dtype=like.dtype, device=like.device))


class Linear(ChainLoraLayer, LoraLinear):
    """torch.nn.Linear, or transformers' Conv1D (fan_in_fan_out=True)."""
