"""Run under torchrun: COLA on a chain adapter under DDP (gloo, CPU); each rank saves its adapter after every knot.

usage: cola_ddp_train.py OUT_DIR CHAIN_TYPE MERGE
"""

import sys

import torch
from helpers import VOCAB
from ranks import save_and_finish, start
from torch.nn.parallel import DistributedDataParallel

from axolotl_chainlora.cola import ColaCallback, ColaSchedule

out_dir, chain_type, merge = sys.argv[1:4]
rank, model = start(chain_type)
wrapped = DistributedDataParallel(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
cola = ColaCallback(ColaSchedule(links=3, knots=(2, 4), merge=merge))
cola.into_base = cola._ties_into_base(cola._layers(model))
# each rank draws its own dropout and A's from its own global RNG: only the seeded link generator keeps them alike
torch.manual_seed(1000 + rank)
snapshots = []
for step in range(1, 7):
    # each rank sees its own data; DDP averages the gradients
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(100 * step + rank))
    optimizer.zero_grad()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    if step in (2, 4):
        cola.tie_knot(model, optimizer, step=step, seed=42)
        snapshots.append(
            {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "lora_" in name}
        )
        # the base weights too: a base merge changes them
        snapshots[-1].update(
            {name: t.detach().clone() for name, t in model.state_dict().items() if "base_layer" in name}
        )
save_and_finish(snapshots, f"{out_dir}/cola-{merge}-rank{rank}.pt")
