"""Training throughput and peak memory of every adapter against PEFT's plain LoRA, measured in one run.

    python bench/throughput.py --preset smoke                      # seconds: keeps the script working (CI)
    python bench/throughput.py --preset cpu                        # the CPU table in the README
    python bench/throughput.py --preset llama3-8b [--quant 4bit]   # GPU: Llama-3-8B-shaped, 8 layers, bf16

`--override KEY=VALUE` (repeatable) changes one setting of the preset or of its model shape, e.g.
`--override steps=5 --override repeats=2` to shorten a GPU run, or `--override num_hidden_layers=1` and a small
`hidden_size`/`intermediate_size` to walk a GPU preset's code paths on the CPU.

On CUDA every method is also measured through axolotl's fused LoRA kernels ("+kernels"; `--kernels` asks for
them elsewhere, e.g. under Triton's interpreter), "lora+kernels" being axolotl's own kernels on PEFT's LoRA.

All methods train the same model on the same batch, interleaved and repeated, the order rotated every
repeat: each ratio to plain LoRA compares runs of the same repeat. Tokens/s come from the median timed
step. "frozen base" runs the model with no adapter and back-propagates to the inputs only: the ceiling
for any adapter. "lora+cola-3" ties its two knots among the timed steps (the steps after a knot run the
new link); each knot is timed on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from axolotl.monkeypatch.lora_kernels import (
    apply_lora_kernel_patches,
    original_apply_o,
    original_apply_qkv,
    patch_self_attn_lora,
)
from axolotl.utils.dict import DictDefault
from common import (
    LLAMA_PROJECTIONS,
    RESULTS,
    Cola,
    Method,
    chain_methods,
    device_name,
    llama,
    with_overrides,
    write_result,
)
from peft import get_peft_model
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from axolotl_chainlora.kernels import use_chain_lora_parameters

PRESETS = {
    "smoke": dict(
        shape=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
        seq=32, batch=2, warmup=1, steps=3, repeats=1,
    ),
    "cpu": dict(
        shape=dict(vocab_size=8192, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2),
        seq=256, batch=4, warmup=2, steps=10, repeats=4,
    ),
    # Llama-3-8B's layers, 8 of them, bf16, seq 2048 x 4
    "llama3-8b": dict(
        shape=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                   num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
        seq=2048, batch=4, warmup=3, steps=10, repeats=3,
    ),
}  # fmt: skip

FROZEN_BASE = Method("frozen base", None, 0)
PLAIN_LORA = "lora"
KERNEL_LORA = "lora+kernels"  # axolotl's own kernels on PEFT's LoRA: what the "+kernels" methods must match


KERNELS = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}


def methods(rank: int, kernels: bool) -> list[Method]:
    adapters = [Method(PLAIN_LORA, None, rank), *chain_methods(rank)]
    fused = [dataclasses.replace(m, name=f"{m.name}+kernels", kernels=True) for m in adapters] if kernels else []
    return [FROZEN_BASE, *adapters, Method("lora+cola-3", "lora", rank, cola_links=3), *fused]


def prepare_kernels(base: LlamaForCausalLM) -> None:
    """What axolotl does once per run with the LoRA kernels on: rewrite the attention class to call apply_qkv and
    apply_o, and (this package's plugin) make the kernels read chain adapters. The base's attention modules get
    axolotl's unfused apply_qkv/apply_o, as its patcher gives every method without the kernels."""
    with tempfile.TemporaryDirectory() as config_dir:
        base.config.save_pretrained(config_dir)  # axolotl finds the attention class from the model's config
        patch_self_attn_lora(DictDefault(base_model=config_dir, model_config_type="llama", **KERNELS))
    use_chain_lora_parameters()
    unfuse(base)


def unfuse(base: LlamaForCausalLM) -> None:
    for layer in base.model.layers:
        layer.self_attn.apply_qkv = types.MethodType(original_apply_qkv, layer.self_attn)
        layer.self_attn.apply_o = types.MethodType(original_apply_o, layer.self_attn)
        layer.mlp.__dict__.pop("forward", None)  # the class's own forward again


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class PeakMemory:
    """Peak memory over one training step: CUDA's allocator statistics, or on the CPU the process's
    resident-set high-water mark (Linux), reset when the step starts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    @contextlib.contextmanager
    def step(self):
        gc.collect()
        if self.libc is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            return
        # blocks of 64 KiB and more straight from and back to the OS for this step: the resident set then
        # follows the live tensors instead of keeping what was freed earlier (too slow for the timed steps)
        self.libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident set
        yield
        status = Path("/proc/self/status").read_text()
        self.peak_gib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20
        self.libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for its dynamic threshold


def base_model(preset: dict, quant: str, device: torch.device) -> LlamaForCausalLM:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = llama(preset["shape"], device, dtype)
    if quant == "4bit":
        # QLoRA as axolotl loads it: NF4, double quantization, compute in the float dtype
        with tempfile.TemporaryDirectory() as saved:
            model.save_pretrained(saved)
            del model
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            model = LlamaForCausalLM.from_pretrained(
                saved, quantization_config=quantization, dtype=dtype, device_map={"": device}
            ).requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()  # transformers skips gradient checkpointing in eval mode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(base, method: Method, preset: dict, batch: torch.Tensor, memory: PeakMemory) -> dict:
    """Train `method` on `base` for the preset's warm-up and timed steps; leave `base` with its own modules
    (a COLA knot on a float32 base adds into its weights, which changes no shape or speed)."""
    warmup, steps = preset["warmup"], preset["steps"]
    if method is FROZEN_BASE:
        model = base
        model.enable_input_require_grads()  # back-propagate to the inputs, through every layer
    else:
        model = get_peft_model(base, method.peft_config(LLAMA_PROJECTIONS)).train()
        if method.kernels:
            apply_lora_kernel_patches(model, DictDefault(model_config_type="llama", **KERNELS))
            assert type(base.model.layers[0].mlp.forward) is types.MethodType, "axolotl's MLP kernel is not in place"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    cola = None
    if method.cola_links > 1:
        knots = tuple(warmup + steps * k // method.cola_links for k in range(1, method.cola_links))
        cola = Cola(method.cola_links, max_steps=warmup + steps, seed=0, knots=knots)
        cola.begin(model)
    knot_seconds = []

    def train_step():
        model(input_ids=batch, labels=batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step_seconds = []
    for step in range(warmup + steps):
        synchronize(batch.device)
        started = time.perf_counter()
        train_step()
        synchronize(batch.device)
        if step >= warmup:
            step_seconds.append(time.perf_counter() - started)
        if cola is not None:
            started = time.perf_counter()
            if cola.step_done(model, optimizer):
                synchronize(batch.device)
                knot_seconds.append(time.perf_counter() - started)
    with memory.step():  # one more step, untimed: the peak, with every COLA link in place
        train_step()
    # the median step: a hiccup of a shared machine does not move it; knots are timed on their own
    result = {"tokens_per_s": batch.numel() / statistics.median(step_seconds), "peak_gib": memory.peak_gib}
    if knot_seconds:
        result["knot_s"] = knot_seconds
    if method is FROZEN_BASE:
        model.disable_input_require_grads()
    else:
        model.unload()  # the base's own modules back, for the next method
        if method.kernels:
            unfuse(base)
    return result


def summarize(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per method: median tokens/s, median of the per-repeat ratios to plain LoRA, peak memory."""
    summary = {}
    for name in runs[0]:
        results = [run[name] for run in runs]
        ratios = [r["tokens_per_s"] / run[PLAIN_LORA]["tokens_per_s"] for r, run in zip(results, runs)]
        peaks = [r["peak_gib"] for r in results]
        summary[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "speed_vs_lora": statistics.median(ratios),
            "speed_vs_lora_range": [min(ratios), max(ratios)],  # the spread between repeats: the noise floor
            "peak_gib": max(peaks),
            "peak_gib_vs_lora": max(p - run[PLAIN_LORA]["peak_gib"] for p, run in zip(peaks, runs)),
        }  # fmt: skip
        if name.endswith("+kernels"):
            summary[name]["speed_vs_lora_kernels"] = statistics.median(
                r["tokens_per_s"] / run[KERNEL_LORA]["tokens_per_s"] for r, run in zip(results, runs)
            )
        knots = [s for r in results for s in r.get("knot_s", [])]
        if knots:
            summary[name]["knot_s_max"] = max(knots)
    return summary


def markdown(summary: dict[str, dict]) -> str:
    kernels = KERNEL_LORA in summary
    lines = [
        "| method | tokens/s | vs LoRA: median (min-max over repeats) |"
        + (" vs LoRA+kernels |" if kernels else "")
        + " peak GiB | vs LoRA (GiB) |",
        "|---|---|---|" + ("---|" if kernels else "") + "---|---|",
    ]
    for name, s in summary.items():
        knot = f" (knot: {s['knot_s_max']:.3f} s max)" if "knot_s_max" in s else ""
        low, high = s["speed_vs_lora_range"]
        vs_kernels = f" {s['speed_vs_lora_kernels']:.3f}x |" if "speed_vs_lora_kernels" in s else " |"
        lines.append(
            f"| {name}{knot} | {s['tokens_per_s']:,.0f} | {s['speed_vs_lora']:.3f}x ({low:.2f}-{high:.2f}) |"
            + (vs_kernels if kernels else "")
            + f" {s['peak_gib']:.2f} | {s['peak_gib_vs_lora']:+.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--quant", choices=["none", "4bit"], default="none")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure every method through axolotl's fused LoRA kernels (default: on CUDA only)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="a preset or shape setting"
    )
    args = parser.parse_args(argv)
    preset, device = with_overrides(PRESETS[args.preset], args.override), torch.device(args.device)

    memory = PeakMemory(device)
    base = base_model(preset, args.quant, device)
    batch = torch.randint(
        0, preset["shape"]["vocab_size"], (preset["batch"], preset["seq"]), generator=torch.Generator().manual_seed(0)
    ).to(device)
    kernels = device.type == "cuda" if args.kernels is None else args.kernels
    if kernels:
        prepare_kernels(base)
    compared = methods(args.rank, kernels)
    runs = []
    for repeat in range(preset["repeats"]):
        shift = repeat % len(compared)
        order = compared[shift:] + compared[:shift]
        run = {method.name: measure(base, method, preset, batch, memory) for method in order}
        runs.append({method.name: run[method.name] for method in compared})
    summary = summarize(runs)
    table = markdown(summary)
    print(table)
    record = {
        "device": device_name(device),
        "settings": {
            "preset": args.preset, **preset, "quant": args.quant, "rank": args.rank, "targets": LLAMA_PROJECTIONS,
            "dtype": str(next(base.parameters()).dtype), "gradient_checkpointing": True, "optimizer": "AdamW",
            "kernels": kernels,
        },
        "summary": summary,
        "runs": runs,
        "table": table,
    }  # fmt: skip
    path = write_result(args.out, f"throughput-{args.preset}-{args.quant}-{device.type}", record)
    print(f"written: {path}")
    return record


if __name__ == "__main__":
    main()
