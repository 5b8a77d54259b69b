"""What every torchrun worker here shares: a gloo group, the same chain adapter on every rank, a clean exit."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_llama  # noqa: E402

from axolotl_chainlora import ChainLoraConfig  # noqa: E402


def start(chain_type: str):
    """Join the group; return this rank and a training chain model that is alike on every rank."""
    dist.init_process_group("gloo")
    config = ChainLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], chain_type=chain_type)
    model = get_peft_model(tiny_llama(), config)  # tiny_llama seeds the base, so every rank starts alike
    return dist.get_rank(), model.train()


def save_and_finish(result, path: str) -> None:
    torch.save(result, path)
    # a rank that leaves while its peer is still in a collective makes gloo abort the peer
    dist.barrier()
    dist.destroy_process_group()
