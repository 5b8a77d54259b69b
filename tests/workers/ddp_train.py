"""Run under torchrun: train a chain adapter with DistributedDataParallel (gloo, CPU) and save each rank's adapter."""

import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import VOCAB, tiny_llama  # noqa: E402

from axolotl_chainlora import ChainLoraConfig  # noqa: E402

out_dir = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
config = ChainLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], chain_type=sys.argv[2])
model = get_peft_model(tiny_llama(), config)  # tiny_llama seeds the base, so every rank starts alike
model.train()
ddp = DistributedDataParallel(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
for step in range(3):
    # each rank sees its own data; DDP averages the gradients
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(100 * step + rank))
    optimizer.zero_grad()
    ddp(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
