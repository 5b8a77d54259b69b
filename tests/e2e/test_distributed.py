"""Chain adapters under DistributedDataParallel and FSDP2: two CPU processes, gloo backend, torchrun.

axolotl itself cannot run several processes on a CPU (it pins each rank's model to an
accelerator device), so this drives the chain layers with torch's own engines.
"""

from __future__ import annotations

import pytest
import torch
from helpers import torchrun


def train_on_two_ranks(tmp_path, chain_type: str, engine: str) -> tuple[dict, dict]:
    torchrun("distributed_train.py", str(tmp_path), chain_type, engine)
    return torch.load(tmp_path / f"{engine}-rank0.pt"), torch.load(tmp_path / f"{engine}-rank1.pt")


@pytest.mark.parametrize("chain_type", ["linchain", "mtlora_icfm"])
def test_ddp_and_fsdp_train_the_same_adapter_on_every_rank(chain_type, tmp_path):
    ddp_rank0, ddp_rank1 = train_on_two_ranks(tmp_path, chain_type, "ddp")
    fsdp_rank0, fsdp_rank1 = train_on_two_ranks(tmp_path, chain_type, "fsdp")
    assert any(".lora_core." in name for name in ddp_rank0)
    assert ddp_rank0.keys() == ddp_rank1.keys() == fsdp_rank0.keys() == fsdp_rank1.keys()
    for name in ddp_rank0:
        # identical on both ranks although each saw different data: the core's gradients were all-reduced
        assert torch.equal(ddp_rank0[name], ddp_rank1[name]), name
        assert torch.equal(fsdp_rank0[name], fsdp_rank1[name]), name
        # sharding the cores (FSDP2) trains them as replicating them (DDP) does
        torch.testing.assert_close(fsdp_rank0[name], ddp_rank0[name], atol=1e-6, rtol=1e-5, msg=name)
    # and training happened: B started at zero
    assert all(ddp_rank0[name].abs().max() > 0 for name in ddp_rank0 if ".lora_B." in name)
