"""The offline demo: a tiny Llama and tokenizer built here and a small generated dataset,
trained with a chain adapter through the real axolotl CLI, then merged and folded.

Nothing is downloaded: the model has random weights and the tokenizer is trained on
the demo data itself.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from . import example_configs

DEMO_CONFIG = "demo.yml"


def demo_records(count: int = 256, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style records of three small tasks a tiny model can learn in a minute."""
    rng = random.Random(seed)
    words = ["chain", "lora", "matrix", "adapter", "knot", "link", "rank", "core", "merge", "train"]
    records = []
    for index in range(count):
        task = index % 3
        if task == 0:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            records.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
        elif task == 1:
            word = rng.choice(words)
            records.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        else:
            word = rng.choice(words)
            records.append({"instruction": "Write the word in capitals.", "input": word, "output": word.upper()})
    return records


def alpaca_text(record: dict[str, str]) -> str:
    prompt = f"### Instruction:\n{record['instruction']}\n"
    if record["input"]:
        prompt += f"### Input:\n{record['input']}\n"
    return prompt + f"### Response:\n{record['output']}"


TINY_LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def build_tiny_llama(out_dir: Path, texts: list[str], seed: int = 0, **shape) -> Path:
    """Save a random tiny Llama (TINY_LLAMA_SHAPE, or `shape`'s LlamaConfig fields instead) and a byte-level BPE
    tokenizer trained on `texts` to `out_dir`."""
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # its bars print blank lines when the output is not a terminal
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        **{**TINY_LLAMA_SHAPE, **shape},
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}


def prepare_demo(out_dir: Path) -> Path:
    """Write the base model, the dataset and the axolotl config into `out_dir`; returns the config."""
    records = demo_records()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    build_tiny_llama(out_dir / "base", [alpaca_text(record) for record in records])
    config = out_dir / "config.yml"
    config.write_text((resources.files(example_configs) / DEMO_CONFIG).read_text())
    return config


def run_axolotl(
    args: list[str], cwd: Path, log_name: str = "axolotl.log", stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run the real `axolotl` command offline, from the environment this package is installed in."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [str(Path(bin_dir) / "axolotl"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True)
    (cwd / log_name).write_text(result.stdout + result.stderr)
    return result


def mean_response_loss(model, tokenizer, records: list[dict[str, str]]) -> float:
    """Mean cross-entropy on the response tokens, the ones alpaca training learns."""
    losses = []
    for record in records:
        prompt = alpaca_text({**record, "output": ""})
        ids = tokenizer(alpaca_text(record) + tokenizer.eos_token, return_tensors="pt").input_ids
        labels = ids.clone()
        labels[:, : len(tokenizer(prompt).input_ids)] = -100
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def run_demo(out_dir: str | Path) -> dict[str, float]:
    """Train LinChain on the tiny model through `axolotl train`, merge with `axolotl merge-lora`,
    and check the adapter, its plain-LoRA fold and the merged model against each other."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new output directory or remove it.")
    config = prepare_demo(out_dir)
    for command, log_name in ((["train", config.name], "train.log"), (["merge-lora", config.name], "merge.log")):
        result = run_axolotl(command, out_dir, log_name)
        if result.returncode != 0:
            raise RuntimeError(
                f"axolotl {' '.join(command)} failed; see {out_dir / log_name}:\n{result.stderr[-3000:]}"
            )

    base_dir, adapter_dir = out_dir / "base", out_dir / "out"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    records = demo_records()[:48]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_loss = mean_response_loss(base, tokenizer, records)
    chain = PeftModel.from_pretrained(base, adapter_dir).eval()
    trained_loss = mean_response_loss(chain, tokenizer, records)
    probe = tokenizer([alpaca_text(record) for record in records[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        chain_logits = chain(**probe).logits
        folded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir / "plain_lora")
        fold_diff = (folded(**probe).logits - chain_logits).abs().max().item()
        merged = AutoModelForCausalLM.from_pretrained(adapter_dir / "merged")
        merge_diff = (merged(**probe).logits - chain_logits).abs().max().item()

    results = {
        "base_response_loss": base_loss,
        "trained_response_loss": trained_loss,
        "fold_max_abs_diff": fold_diff,
        "merge_max_abs_diff": merge_diff,
    }
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
