"""Does a core fit better than plain LoRA at the same budget? Distillation onto a known higher-rank update.

    python bench/convergence.py --preset smoke   # seconds: keeps the script working (CI)
    python bench/convergence.py --preset cpu     # the README's table and plot, a few minutes on a CPU
    python bench/convergence.py --preset large   # a larger model and more steps, for a GPU

The base is a small Llama with random weights, drawn wide enough (initializer_range) that its
next-token distributions are far from uniform. The teacher is the base plus a known update of rank
`teacher_rank` > r on every targeted projection, with singular values decaying by 0.9 per direction, so
rank r can capture most of it but not all. Each student is the base with one adapter of rank r, trained
to match the teacher (KL(teacher || student) per token) on random token sequences drawn fresh at every
step. Every method gets the same steps, LR grid, schedule and seeds. The table reports each method's
held-out KL at its best LR (mean +/- std over the seeds); the plot shows the training loss at that LR.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    FOLDED_CHAIN_INIT,
    LLAMA_PROJECTIONS,
    RESULTS,
    Method,
    at_grid_edge,
    best_lr,
    chain_methods,
    device_name,
    llama,
    run_grid,
    train_adapter,
    with_adapter,
    write_result,
)
from torch import nn

PRESETS = {
    "smoke": dict(
        shape=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1),
        rank=4, teacher_rank=16, seq=16, batch=8, steps=6, lrs=[1e-3], seeds=[0], eval_sequences=16,
    ),
    "cpu": dict(
        shape=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1),
        rank=8, teacher_rank=32, seq=32, batch=16, steps=300, lrs=[3e-3, 1e-2, 3e-2, 1e-1], seeds=[0, 1, 2],
        eval_sequences=64,
    ),
    "large": dict(
        shape=dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, initializer_range=0.05),
        rank=16, teacher_rank=64, seq=64, batch=32, steps=1000, lrs=[1e-3, 3e-3, 1e-2, 3e-2], seeds=[0, 1, 2],
        eval_sequences=128,
    ),
}  # fmt: skip

TEACHER_UPDATE_NORM = 0.5  # |delta W| / |W| of every targeted projection
SPECTRUM_DECAY = 0.9


def methods(rank: int) -> list[Method]:
    chains = chain_methods(rank)
    # the papers' Kaiming cores shrink the update; identity init (T = I) starts from LoRA's scale instead
    with_identity_init = (f"linchain-3-{rank}", "moslora")
    identity = [replace(m, name=f"{m.name}, identity init", chain_init="identity") for m in chains
                if m.name in with_identity_init]  # fmt: skip
    return [
        Method("lora", None, rank),
        Method(FOLDED_CHAIN_INIT, None, rank),
        *chains,
        *identity,
        *(Method(f"cola-{links}", "lora", rank, cola_links=links) for links in (1, 2, 3)),
    ]


@torch.no_grad()
def teacher_of(base: nn.Module, rank: int, generator: torch.Generator) -> nn.Module:
    """The base plus U diag(0.9^i) V^T (orthonormal U, V of `rank` columns) on every targeted projection."""
    teacher = copy.deepcopy(base)
    for name, module in teacher.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
            out_features, in_features = module.weight.shape
            k = min(rank, out_features, in_features)
            U = torch.linalg.qr(torch.randn(out_features, k, generator=generator))[0]
            V = torch.linalg.qr(torch.randn(in_features, k, generator=generator))[0]
            delta = U @ torch.diag(SPECTRUM_DECAY ** torch.arange(k, dtype=torch.float32)) @ V.T
            delta *= TEACHER_UPDATE_NORM * module.weight.norm() / delta.norm()
            module.weight += delta.to(module.weight)
    return teacher


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over the tokens."""
    log_q, log_p = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()


def train(base, teacher, method: Method, lr: float, seed: int, preset: dict, held_out: tuple) -> dict:
    """One student: the training loss at every step and the held-out KL at the end."""
    vocab, device = preset["shape"]["vocab_size"], held_out[0].device
    torch.manual_seed(seed)  # the adapter's initial draw
    model = with_adapter(base, method, LLAMA_PROJECTIONS)
    data = torch.Generator().manual_seed(10_000 + seed)

    def loss_at_step() -> torch.Tensor:
        ids = torch.randint(0, vocab, (preset["batch"], preset["seq"]), generator=data).to(device)
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
        return kl(model(input_ids=ids).logits, target)

    curve, _ = train_adapter(model, method, lr, preset["steps"], seed, loss_at_step)
    with torch.no_grad():
        final = kl(model.eval()(input_ids=held_out[0]).logits, held_out[1]).item()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"curve": curve, "held_out_kl": final, "trainable_parameters": trainable}


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
    """Per method: the LR with the lowest mean held-out KL, and the mean, std and mean curve there."""
    summary = {}
    for name, by_lr in runs.items():
        means = {lr: statistics.mean(run["held_out_kl"] for run in seeds) for lr, seeds in by_lr.items()}
        best = best_lr(by_lr, "held_out_kl")
        finals = [run["held_out_kl"] for run in by_lr[best]]
        summary[name] = {
            "best_lr": float(best),
            "held_out_kl_mean": means[best],
            "held_out_kl_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "held_out_kl_by_lr": {str(lr): mean for lr, mean in means.items()},
            "trainable_parameters": by_lr[best][0]["trainable_parameters"],
            "mean_curve": [statistics.mean(step) for step in zip(*(run["curve"] for run in by_lr[best]))],
        }
    return summary


def markdown(summary: dict[str, dict], start_kl: float, lrs: list[float]) -> str:
    lora = summary["lora"]["held_out_kl_mean"]
    lines = [
        f"Held-out KL(teacher || student) at each method's best LR; the base starts at {start_kl:.4f}.",
        "A best LR marked * is at the edge of the grid: the method may do better outside it.",
        "",
        "| method | trainable params | best LR | held-out KL (mean +/- std) | vs LoRA |",
        "|---|---|---|---|---|",
    ]
    for name, s in sorted(summary.items(), key=lambda item: item[1]["held_out_kl_mean"]):
        edge = "*" if at_grid_edge(s["best_lr"], lrs) else ""
        lines.append(
            f"| {name} | {s['trainable_parameters']:,} | {s['best_lr']:g}{edge} | {s['held_out_kl_mean']:.4f} +/- "
            f"{s['held_out_kl_std']:.4f} | {s['held_out_kl_mean'] / lora:.3f}x |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    axes.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])  # 20 distinct colours
    for name, s in summary.items():
        curve = torch.tensor(s["mean_curve"])
        window = max(1, len(curve) // 30)  # a moving average: each step's batch is a fresh draw
        smooth = curve.unfold(0, window, 1).mean(-1) if len(curve) >= window else curve
        style = "--" if name.startswith(("lora", "cola-1")) else "-"
        axes.plot(range(window, window + len(smooth)), smooth, style, label=f"{name} (lr {s['best_lr']:g})")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training KL(teacher || student)")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


Setup = tuple  # (preset, base, teacher, (held-out ids, teacher logits), start KL)
_WORKER_SETUP: Setup | None = None


def setup(preset_name: str, device: torch.device) -> Setup:
    """The base, the teacher and the held-out set: seeded, so every worker process builds the same."""
    preset = PRESETS[preset_name]
    base = llama(preset["shape"], device, torch.float32)
    teacher = teacher_of(base, preset["teacher_rank"], torch.Generator().manual_seed(1)).eval()
    held_out_ids = torch.randint(
        0, preset["shape"]["vocab_size"], (preset["eval_sequences"], preset["seq"]),
        generator=torch.Generator().manual_seed(2),
    ).to(device)  # fmt: skip
    with torch.no_grad():
        held_out = (held_out_ids, teacher(input_ids=held_out_ids).logits)
        start_kl = kl(base(input_ids=held_out_ids).logits, held_out[1]).item()
    return preset, base, teacher, held_out, start_kl


def _start_worker(preset_name: str, device: str) -> None:
    global _WORKER_SETUP
    _WORKER_SETUP = setup(preset_name, torch.device(device))


def _train_in_worker(method: Method, lr: float, seed: int) -> dict:
    preset, base, teacher, held_out, _ = _WORKER_SETUP
    return train(base, teacher, method, lr, seed, preset, held_out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: one per CPU core; 1 on a GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    jobs = args.jobs or (1 if device.type == "cuda" else os.cpu_count())

    preset, base, teacher, held_out, start_kl = setup(args.preset, device)
    grid = [(m, lr, seed) for m in methods(preset["rank"]) for lr in preset["lrs"] for seed in preset["seeds"]]
    results = run_grid(grid, _train_in_worker, jobs, _start_worker, (args.preset, args.device))
    runs = {}
    for (method, lr, _), result in zip(grid, results):
        runs.setdefault(method.name, {}).setdefault(lr, []).append(result)
    summary = summarize(runs)
    table = markdown(summary, start_kl, preset["lrs"])
    print(table)
    name = f"convergence-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(summary, args.out / f"{name}.png", f"{args.preset}: rank {preset['rank']} students of a "
         f"rank-{preset['teacher_rank']} teacher, mean of {len(preset['seeds'])} seeds")  # fmt: skip
    record = {
        "device": device_name(device),
        "settings": {
            "preset": args.preset, **preset, "targets": LLAMA_PROJECTIONS, "teacher_update_norm": TEACHER_UPDATE_NORM,
            "spectrum_decay": SPECTRUM_DECAY, "optimizer": "AdamW, weight decay 0, cosine schedule, 5% warmup",
            "lora_alpha": "2 r",
        },
        "start_kl": start_kl,
        "summary": summary,
        "table": table,
    }  # fmt: skip
    path = write_result(args.out, name, record)
    print(f"written: {path}")
    return record


if __name__ == "__main__":
    main()
