"""Shared fixtures (tiny random models built here, nothing downloaded) and the e2e and gpu markers."""

from __future__ import annotations

import os

# before torch and transformers are imported: huggingface_hub reads these at import
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's interpreter runs axolotl's Triton kernels on CPU tensors (tests/unit/test_kernels.py); it must be
    # set before Triton is imported, which transformers and peft do
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import make_input_ids, tiny_gpt2, tiny_llama  # noqa: E402

from axolotl_chainlora.demo import prepare_demo  # noqa: E402

E2E = Path(__file__).parent / "e2e"
GPU = Path(__file__).parent / "gpu"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e is an e2e test, every one under tests/gpu a gpu test; a gpu test is skipped where
    CUDA is not available."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)
        if item.path.is_relative_to(GPU):
            item.add_marker(pytest.mark.gpu)
        if not has_cuda and item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return make_input_ids()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo's tiny Llama + tokenizer (base/), data.jsonl and config.yml, built once; read, never written."""
    path = tmp_path_factory.mktemp("chain-demo")
    prepare_demo(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(path)
    return str(path)
