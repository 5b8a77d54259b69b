"""axolotl's LoRA kernels on a chain adapter through the real `axolotl train`, on the CPU.

cpu_kernels/sitecustomize.py lets every process of these runs execute axolotl's Triton kernels under
Triton's interpreter. The same LinChain YAML trains with `lora_*_kernel: true` and with them false; the
two adapters must agree to float32 rounding after 20 steps, and a run whose kernels read axolotl's own
`get_lora_parameters` (the negative control) must stop instead of training plain LoRA.

Runtime on a 2-core CPU: about a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import KERNELS, TRAIN_STEPS, logged_losses, output_of, require_success, run_all, write_config
from safetensors.torch import load_file

from axolotl_chainlora.export import ADAPTER_WEIGHTS

SHIM = Path(__file__).parent / "cpu_kernels"
# run name -> the YAML, trained with the kernels and without ("<name>-unfused")
ADAPTERS = {
    "linchain": {"adapter": "linchain", "linchain_dims": [8, 16, 8]},
    # COLA rebuilds plain LoRA as chain layers after axolotl built it; the knot at step 10 ties the first link
    # beside the base, which the kernels then read stacked in front of the second
    "cola": {"adapter": "lora", "cola_links": 2, "cola_merge": "frozen"},
}
# the relative Frobenius difference of an adapter tensor between the two runs after 20 AdamW steps: float32
# rounding, which Adam turns into up to 2 lr in an element whose gradient is near zero. Measured at most 2e-5 with
# axolotl 0.21 and 1.8e-3 with 0.19 (COLA's second link's B, 10 steps from zero), median 8e-6; the core trained
# by one run and left out by the other would change the logged losses too
ADAPTER_TOLERANCE = 1e-2

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the runs would train on the GPU; tests/gpu compares the kernels there"
)


@pytest.fixture(scope="module")
def runs(workspace):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")])))
        configs = {"stock-lookup": write_config(workspace, "stock-lookup", **ADAPTERS["linchain"], **KERNELS)}
        for name, adapter in ADAPTERS.items():
            configs[name] = write_config(workspace, name, **adapter, **KERNELS)
            configs[f"{name}-unfused"] = write_config(
                workspace, f"{name}-unfused", **adapter, **dict.fromkeys(KERNELS, False)
            )
        return run_all(workspace, {name: ["train", config] for name, config in configs.items()})


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_kernels_train_as_the_unfused_layers_do(workspace, runs, name):
    require_success(runs[name], f"axolotl train {name} with the LoRA kernels")
    require_success(runs[f"{name}-unfused"], f"axolotl train {name} without the LoRA kernels")
    kernel_log, unfused_log = output_of(runs[name]), output_of(runs[f"{name}-unfused"])
    assert "axolotl's LoRA kernels (lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel) compute it exactly" in kernel_log
    assert "Patched attention class with LoRA optims" in kernel_log
    assert "compute it exactly" not in unfused_log

    fused = load_file(workspace / f"out-{name}" / ADAPTER_WEIGHTS)
    unfused = load_file(workspace / f"out-{name}-unfused" / ADAPTER_WEIGHTS)
    core = "lora_core" if name == "linchain" else "lora_tied_A"
    assert fused.keys() == unfused.keys() and any(core in key for key in fused)
    errors = {key: ((fused[key] - unfused[key]).norm() / unfused[key].norm()).item() for key in fused}
    worst = max(errors, key=errors.get)
    assert errors[worst] < ADAPTER_TOLERANCE, f"{worst}: {errors[worst]:.2e}"
    # training ran: B starts at zero; the per-step losses agree to the 4 digits the log shows
    assert all(fused[key].abs().max() > 0.01 for key in fused if "lora_B" in key)
    losses = logged_losses(kernel_log)
    assert len(losses) == TRAIN_STEPS and losses == logged_losses(unfused_log)


def test_kernels_reading_plain_lora_stop_the_run(runs):
    result = runs["stock-lookup"]
    assert result.returncode != 0
    assert "they would train plain LoRA" in output_of(result)
