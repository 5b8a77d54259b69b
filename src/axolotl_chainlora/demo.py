"""The offline demo: a tiny Llama and tokenizer built here, a small generated dataset,
a chain adapter trained with the transformers Trainer, then saved, folded and merged.

Nothing is downloaded: the model has random weights and the tokenizer is trained on
the demo data itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def build_tiny_llama(out_dir: Path, texts: list[str], seed: int = 0) -> Path:
    """Save a random tiny Llama and a byte-level BPE tokenizer trained on `texts` to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def run_demo(out_dir: str | Path, chain_type: str = "linchain", steps: int = 60) -> dict[str, float]:
    """Train, save, fold and merge a chain adapter on the tiny model; returns the measured numbers."""
    from peft import PeftModel, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from . import ChainLoraConfig, fold_to_lora, merge_to_full_model

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new output directory or remove it.")
    records = demo_records()
    texts = [alpaca_text(record) for record in records]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    base_dir = build_tiny_llama(out_dir / "base", texts)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset = [tokenizer(text + tokenizer.eos_token) for text in texts]
    config = ChainLoraConfig(
        r=8, lora_alpha=16, target_modules=DEMO_TARGETS, chain_type=chain_type, task_type="CAUSAL_LM"
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.print_trainable_parameters()

    losses: list[float] = []

    class RecordLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[RecordLoss()]).train()
    model.save_pretrained(out_dir / "adapter")

    model.eval()
    probe = tokenizer(texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        chain_logits = model(**probe).logits
        fold_to_lora(out_dir / "adapter", out_dir / "lora")
        folded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_dir / "lora")
        fold_diff = (folded(**probe).logits - chain_logits).abs().max().item()
        merge_to_full_model(out_dir / "adapter", base_dir, out_dir / "merged")
        merged = AutoModelForCausalLM.from_pretrained(out_dir / "merged")
        merge_diff = (merged(**probe).logits - chain_logits).abs().max().item()

    results = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "fold_max_abs_diff": fold_diff,
        "merge_max_abs_diff": merge_diff,
    }
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
