"""Chain adapters under DistributedDataParallel: two CPU processes, gloo backend, launched by torchrun.

(axolotl itself cannot run several processes on a CPU: it pins each rank's model to an
accelerator device. This tests the chain layers under DDP directly.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"


@pytest.mark.parametrize("chain_type", ["linchain", "mtlora_icfm"])
def test_ranks_hold_identical_trained_adapters(chain_type, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path),
        chain_type,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any(".lora_core." in name for name in rank0)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        # identical on both ranks although each saw different data: the core's gradients were all-reduced
        assert torch.equal(rank0[name], rank1[name]), name
    # and training happened: B started at zero
    assert all(rank0[name].abs().max() > 0 for name in rank0 if ".lora_B." in name)
