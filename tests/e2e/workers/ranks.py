"""What every torchrun worker here shares: a gloo group, the same chain adapter on every rank, a clean exit.

The workers import helpers from tests/, which test_distributed.py puts on PYTHONPATH.
"""

import torch
import torch.distributed as dist
from helpers import chain_model


def start(chain_type: str, **overrides):
    """Join the group; return this rank and a training chain model that is alike on every rank."""
    dist.init_process_group("gloo")
    # LinChain with its default r x r links; tiny_llama seeds the base, so every rank starts alike
    model = chain_model(chain_type, seed=None, chain_dims=None, **overrides)
    return dist.get_rank(), model.train()


def save_and_finish(result, path: str) -> None:
    torch.save(result, path)
    # a rank that leaves while its peer is still in a collective makes gloo abort the peer
    dist.barrier()
    dist.destroy_process_group()
