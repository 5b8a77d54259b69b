"""Run under torchrun: train a chain adapter with DDP or FSDP2 (gloo, CPU) and save each rank's adapter.

usage: distributed_train.py OUT_DIR CHAIN_TYPE ddp|fsdp
"""

import sys

import torch
import torch.distributed as dist
from helpers import VOCAB
from ranks import save_and_finish, start
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

out_dir, chain_type, engine = sys.argv[1:4]
rank, model = start(chain_type)
if engine == "ddp":
    wrapped = DistributedDataParallel(model)
else:  # FSDP2 as axolotl applies it: each decoder layer, then the whole model
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    wrapped = fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
for step in range(3):
    # each rank sees its own data; both engines average the gradients
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(100 * step + rank))
    optimizer.zero_grad()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
adapter = {}
for name, param in model.named_parameters():
    if param.requires_grad:
        # FSDP2 keeps each rank's shard as a DTensor: gather the full tensor
        adapter[name] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()
save_and_finish(adapter, f"{out_dir}/{engine}-rank{rank}.pt")
