"""Shared fixtures: tiny random models built here, nothing downloaded."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96


def tiny_llama(hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


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


def reference_core(chain_type: str, factors: list[torch.Tensor]) -> torch.Tensor:
    """T by the papers' definitions (DESIGN.md section 1), in float64; independent of cores.py.

    `factors` are the core's tensors in the order weight, weight_1, ...
    """
    factors = [f.detach().double() for f in factors]
    if chain_type in ("moslora", "mtlora_shim"):
        (C,) = factors
        return C
    if chain_type == "linchain":
        T = factors[0]
        for link in factors[1:]:
            T = T @ link
        return T
    if chain_type == "mtlora_icfm":
        (C,) = factors
        return C @ C.T
    if chain_type == "mtlora_ctcm":
        C, D = factors
        return C @ D
    if chain_type == "mtlora_dtsm":
        C, D = factors
        return C + D
    raise AssertionError(chain_type)


def saved_core_factors(tensors: dict[str, torch.Tensor], module_key: str) -> list[torch.Tensor]:
    """One module's core tensors from a saved adapter file, in float64, ordered weight, weight_1, weight_2, ..."""
    prefix = f"{module_key}.lora_core."
    names = [key[len(prefix) :] for key in tensors if key.startswith(prefix)]
    expected = ["weight"] + [f"weight_{i}" for i in range(1, len(names))]
    assert sorted(names) == sorted(expected), names
    return [tensors[prefix + name].double() for name in expected]


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor (B included) non-zero values, so outputs really depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
