"""What a COLA knot must do on each training engine to change trainable parameters in the middle of a run.

A knot rewrites a link's parameters in place (and, with `cola_merge: base`, the frozen base weight), then gives
the optimizer fresh state for them. Each engine keeps those parameters its own way:

- one process, DDP: whole tensors; the optimizer's state is keyed by the parameters themselves.
- FSDP2 (`fully_shard`): each parameter is a DTensor holding this rank's shard. `full` gathers whole tensors
  (a collective: every rank visits the modules in the same order) and writes the result back into the shards;
  the optimizer's state is keyed by the DTensors, as under DDP.
- DeepSpeed ZeRO-1/2: whole 16-bit parameters (views of DeepSpeed's flat buffer), but the optimizer steps an
  fp32 master copy, partitioned, whose Adam state is keyed by flat partitions (`optimizer.state[param]` is
  empty). The knot writes the master copy (`safe_set_full_fp32_param`) and zeroes each flat partition's state.
- DeepSpeed ZeRO-3: every parameter is partitioned (`p.shape` is (0,) outside a gather). The knot runs inside
  `GatheredParameters(modifier_rank=0)`, writes each rank's master slice (`safe_set_local_fp32_param`) and
  zeroes the state as under ZeRO-2.

Adam keeps its step count per flat partition under DeepSpeed, so only a partition that holds link parameters
alone can be reset; a partition shared with other trainable parameters (`lora_modules_to_save`) is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class TorchEngine:
    """One process, DDP, FSDP2: the optimizer holds the parameters themselves."""

    @contextlib.contextmanager
    def full(self, module: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
        """Within: `params` (of `module`) are whole tensors that can be read and written in place, through the
        module's attributes or as the list this yields."""
        yield params

    def write_master(self, params: list[nn.Parameter]) -> None:
        """Copy the parameters' new values into the engine's own master copy, where it keeps one."""

    def reset_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """Give `params` the state a fresh optimizer of the same kind has before its first step.

        Most optimizers (torch's Adam/AdamW/SGD, bitsandbytes' 8-bit and paged ones) create their state lazily
        when it is empty: the entry is dropped, never masked (bitsandbytes' 8-bit state holds codes whose zero is
        not a zero value). torch's Adagrad creates it in its constructor, so it gets that.
        """
        # accelerate's AcceleratedOptimizer wraps the optimizer that holds the state
        optimizer = getattr(optimizer, "optimizer", optimizer)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for param in params:
            optimizer.state.pop(param, None)
            if isinstance(optimizer, torch.optim.Adagrad) and id(param) in group_of:
                group = group_of[id(param)]
                fresh = torch.optim.Adagrad(
                    [param], initial_accumulator_value=group["initial_accumulator_value"], fused=group["fused"]
                )
                optimizer.state[param] = fresh.state[param]


class Fsdp2Engine(TorchEngine):
    """FSDP2: parameters are DTensor shards; the knot computes on gathered whole tensors."""

    @contextlib.contextmanager
    def full(self, module: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
        # each sharded parameter is swapped for a whole copy while the knot computes, then scattered back into
        # its shard: the DTensor stays the object the optimizer holds
        wholes = {
            id(p): nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
            for p in params
            if isinstance(p, DTensor)
        }
        swapped = []
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if id(param) in wholes:
                    owner._parameters[name] = wholes[id(param)]
                    swapped.append((owner, name, param, wholes[id(param)]))
        try:
            yield [wholes.get(id(p), p) for p in params]
        finally:
            for owner, name, sharded, whole in swapped:
                owner._parameters[name] = sharded
                with torch.no_grad():
                    # every rank computed the same whole tensor: each keeps its own shard of it
                    sharded.copy_(distribute_tensor(whole.data, sharded.device_mesh, sharded.placements,
                                                    src_data_rank=None))  # fmt: skip


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO-1/2: whole 16-bit parameters, a partitioned fp32 master copy and flat optimizer state."""

    def write_master(self, params: list[nn.Parameter]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        for param in params:
            safe_set_full_fp32_param(param, param.data.float())

    # the ZeRO optimizer's (model parameters, flat fp32 partition) of each of its groups
    groups, flats = "bit16_groups", "single_partition_of_fp32_groups"

    def reset_state(self, optimizer, params: list[nn.Parameter]) -> None:
        # accelerate's wrapper holds the ZeRO optimizer, which holds the torch one whose state is keyed by flats
        while not hasattr(optimizer, self.groups):
            if not hasattr(optimizer, "optimizer"):
                raise RuntimeError(
                    f"COLA under DeepSpeed resets the optimizer of ZeRO stages 1-3, not a {type(optimizer).__name__}: "
                    "set zero_optimization.stage to 1, 2 or 3 in the deepspeed config."
                )
            optimizer = optimizer.optimizer
        inner = optimizer.optimizer
        link = {id(p) for p in params}
        for members, flat in zip(getattr(optimizer, self.groups), getattr(optimizer, self.flats)):
            held = [id(p) in link for p in members]
            if not any(held):
                continue
            if not all(held):
                raise RuntimeError(
                    "COLA under DeepSpeed: an optimizer group holds the link's parameters together with other "
                    "trainable parameters, and DeepSpeed keeps Adam's step count per group, so the link's state "
                    "cannot be reset alone. Train only the adapter (remove lora_modules_to_save)."
                )
            _zero_state(inner.state.get(flat, {}))
            for group in inner.param_groups:
                if "step" in group and any(p is flat for p in group["params"]):
                    group["step"] = 0  # DeepSpeed's FusedAdam counts steps per group


class DeepSpeedZero3Engine(DeepSpeedEngine):
    """DeepSpeed ZeRO-3: every parameter partitioned, gathered for the knot."""

    @contextlib.contextmanager
    def full(self, module: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
        import deepspeed

        # every rank computes the same knot; rank 0's result is partitioned back
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield params

    def write_master(self, params: list[nn.Parameter]) -> None:
        from deepspeed.utils import safe_set_local_fp32_param

        for param in params:
            # this rank's slice, padded as DeepSpeed pads it: the full variant fails on sizes the world size
            # does not divide
            safe_set_local_fp32_param(param, param.ds_tensor.data.float())

    groups, flats = "fp16_groups", "fp32_partitioned_groups_flat"


# torch's Adam/AdamW and DeepSpeed's FusedAdam/DeepSpeedCPUAdam
ADAM_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def _zero_state(state: dict) -> None:
    """Adam's state as a fresh optimizer's: moments and step at zero (a step of 0 is 'never stepped')."""
    if set(state) - ADAM_STATE:
        raise RuntimeError(
            f"COLA under DeepSpeed resets Adam's state ({', '.join(sorted(ADAM_STATE))}), but the optimizer keeps "
            f"{sorted(set(state) - ADAM_STATE)}: use torch's AdamW or DeepSpeed's Adam."
        )
    for key, value in state.items():
        if torch.is_tensor(value):
            value.zero_()
        elif isinstance(value, (int, float)):
            state[key] = type(value)(0)


def engine_of(params: list[nn.Parameter]) -> TorchEngine:
    """The engine that holds `params`, told by what it attaches to them."""
    if any(hasattr(p, "ds_id") for p in params):
        return DeepSpeedZero3Engine()
    if any(hasattr(p, "_hp_mapping") for p in params):
        return DeepSpeedEngine()
    if any(isinstance(p, DTensor) for p in params):
        return Fsdp2Engine()
    return TorchEngine()
