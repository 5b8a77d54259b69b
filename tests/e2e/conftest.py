"""The demo workspace of the axolotl runs: one per test module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from axolotl_chainlora.demo import alpaca_text, demo_records, prepare_demo


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The demo's tiny random Llama (base/), its tokenizer, data.jsonl and config.yml, built offline."""
    path = tmp_path_factory.mktemp("axolotl-e2e")
    prepare_demo(path)
    with pytest.MonkeyPatch.context() as patch:
        # the runs tokenize into their own datasets cache: none shared with ~/.cache or other test runs
        patch.setenv("HF_DATASETS_CACHE", str(path / "hf-datasets-cache"))
        yield path


@pytest.fixture(scope="module")
def probe(workspace) -> dict[str, torch.Tensor]:
    """Four alpaca texts of the demo's tasks, tokenized and padded: ids and attention mask."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    texts = [alpaca_text(record) for record in demo_records(count=4, seed=7)]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))
