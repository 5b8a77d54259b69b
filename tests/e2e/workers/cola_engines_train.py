"""Run under torchrun: COLA knots under DDP, FSDP2, DeepSpeed ZeRO-2 or ZeRO-3 (gloo, CPU), in a hand-written loop.

usage: cola_engines_train.py OUT_DIR ENGINE MERGE [--ranks 3,2,2] [--control CONTROL] [--bf16]
    ENGINE   ddp | fsdp2 | zero2 | zero3
    MERGE    base | frozen (where the knots tie the links)
    --ranks    the links' ranks (default 3,3,3)
    --control  no-master | no-state-reset | keep-step: a knot with one of its writes left out (negative controls)
    --bf16     bf16 compute: DeepSpeed's bf16 mode, FSDP2's MixedPrecisionPolicy

Each rank saves, after every step, the whole adapter and the adapted base weights as it holds them; after the first
step of each link, how far that step was from a fresh torch AdamW's first step on the same parameters and
gradients; and at the end rank 0 saves the adapter with PEFT (gathered where the engine shards it).
"""

import argparse
import os

import torch
import torch.distributed as dist
from helpers import VOCAB
from ranks import save_and_finish, start

from axolotl_chainlora import engines
from axolotl_chainlora.cola import ColaCallback, ColaSchedule

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("engine", choices=["ddp", "fsdp2", "zero2", "zero3"])
parser.add_argument("merge", choices=["base", "frozen"])
parser.add_argument("--ranks", default="3,3,3")
parser.add_argument("--control", choices=["no-master", "no-state-reset", "keep-step"])
parser.add_argument("--bf16", action="store_true")
args = parser.parse_args()
out_dir, engine_name, merge, control = args.out_dir, args.engine, args.merge, args.control
ranks = tuple(int(r) for r in args.ranks.split(","))
KNOTS, STEPS, LR, WEIGHT_DECAY = (2, 4), 6, 1e-2, 0.01

# rank 3: each core factor has 9 elements, which 2 ranks cannot split evenly
rank, model = start("mtlora_ctcm", r=ranks[0], lora_alpha=2 * ranks[0], task_type="CAUSAL_LM")
trainable = [p for p in model.parameters() if p.requires_grad]
torch_optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
if engine_name == "ddp":
    wrapped, optimizer = torch.nn.parallel.DistributedDataParallel(model), torch_optimizer
elif engine_name == "fsdp2":  # as axolotl applies it: each decoder layer, then the whole model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    wrapped = fully_shard(model, mesh=mesh, mp_policy=policy)
    trainable = [p for p in model.parameters() if p.requires_grad]  # now DTensors
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
else:
    import deepspeed

    # DeepSpeed's shared-memory collectives would first compile a C++ op (minutes); gloo does the job
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    stage = int(engine_name[-1])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # one sub-group per parameter under ZeRO-3 (the Trainer tests keep the default: one for all)
        "zero_optimization": {"stage": stage, "sub_group_size": 1, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.bf16},
    }
    wrapped, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch_optimizer, config=config)

if control == "no-master":
    engines.DeepSpeedEngine.write_master = lambda self, params: None
    engines.DeepSpeedZero3Engine.write_master = lambda self, params: None
elif control == "no-state-reset":
    for engine_class in (engines.TorchEngine, engines.DeepSpeedEngine):
        engine_class.reset_state = lambda self, optimizer, params: None
elif control == "keep-step":  # DeepSpeed: the moments zeroed, Adam's step count kept
    zero_state = engines._zero_state
    engines._zero_state = lambda state: zero_state({k: v for k, v in state.items() if k != "step"})

cola = ColaCallback(ColaSchedule(links=len(ranks), knots=KNOTS, ranks=ranks, merge=merge))
cola.into_base = cola._ties_into_base(cola._layers(model))
engine = engines.engine_of(trainable)
watched = trainable + [layer.get_base_layer().weight for layer in cola._layers(model).values()]
names = {id(p): name for name, p in model.named_parameters()}


def whole(params) -> dict[str, torch.Tensor]:
    """The parameters as whole tensors, however the engine holds them (a collective: every rank calls it)."""
    with engine.full(model, params) as tensors:
        return {names[id(p)]: t.detach().float().clone() for p, t in zip(params, tensors)}


def full_gradients() -> dict[str, torch.Tensor]:
    """The averaged gradients the optimizer is about to apply."""
    if engine_name.startswith("zero"):
        from deepspeed.utils import safe_get_full_grad

        return {names[id(p)]: safe_get_full_grad(p).float().clone() for p in trainable}
    return {names[id(p)]: (p.grad.full_tensor() if engine_name == "fsdp2" else p.grad).clone() for p in trainable}


def fresh_adamw_step(before: dict, gradients: dict) -> dict[str, torch.Tensor]:
    """What a fresh torch AdamW's first step makes of `before` with `gradients`."""
    params = {name: torch.nn.Parameter(value.clone()) for name, value in before.items()}
    for name, param in params.items():
        param.grad = gradients[name]
    torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WEIGHT_DECAY).step()
    return {name: param.detach() for name, param in params.items()}


snapshots, first_updates = [], []
for step in range(1, STEPS + 1):
    # each rank sees its own data; every engine averages the gradients
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(100 * step + rank))
    # bf16 steps round differently from a float32 AdamW: there only the knots themselves are checked
    first_of_link = step - 1 in KNOTS and not args.bf16
    before = whole(trainable) if first_of_link else None
    if engine_name.startswith("zero"):
        wrapped.backward(wrapped(input_ids=ids, labels=ids).loss)
        gradients = full_gradients() if first_of_link else None
        wrapped.step()
    else:
        optimizer.zero_grad()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        gradients = full_gradients() if first_of_link else None
        optimizer.step()
    if first_of_link:
        expected, after = fresh_adamw_step(before, gradients), whole(trainable)
        first_updates.append(max((after[name] - expected[name]).abs().max().item() for name in after))
    if step in KNOTS:
        cola.tie_knot(model, optimizer, step=step, seed=42)
    snapshots.append(whole(watched))
    # the tied factors: buffers every rank holds whole
    snapshots[-1].update({n: b.detach().float().clone() for n, b in model.named_buffers() if "lora_tied_" in n})

if engine_name == "zero3":
    state_dict = wrapped._zero3_consolidated_16bit_state_dict()
elif engine_name == "fsdp2":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
else:
    state_dict = None
if rank == 0:
    model.save_pretrained(os.path.join(out_dir, f"{engine_name}-{merge}-adapter"), state_dict=state_dict)
save_and_finish(
    {"snapshots": snapshots, "first_updates": first_updates}, f"{out_dir}/{engine_name}-{merge}-rank{rank}.pt"
)
