"""The GPU suite's workspace: the demo's tokenizer and alpaca data, a larger random Llama and a bf16 YAML."""

from __future__ import annotations

import pytest
import yaml

from axolotl_chainlora.demo import alpaca_text, build_tiny_llama, demo_records, prepare_demo

# every run of the suite: bf16, SDPA, sample packing, gradient checkpointing (write_config adds 20 steps)
GPU_YAML = {
    "bf16": True,
    "sequence_len": 512,
    "sample_packing": True,
    "sdp_attention": True,
    "gradient_checkpointing": True,
    "micro_batch_size": 2,
    "learning_rate": 2e-3,
}


@pytest.fixture(scope="session")
def gpu_workspace(tmp_path_factory):
    """prepare_demo's workspace with its tiny model replaced by a Llama of hidden 512, 4 layers (head dim 64, as
    flash attention wants), random weights; config.yml asks for GPU_YAML."""
    path = tmp_path_factory.mktemp("gpu")
    prepare_demo(path)
    texts = [alpaca_text(record) for record in demo_records()]
    build_tiny_llama(path / "base", texts, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
    cfg = yaml.safe_load((path / "config.yml").read_text())
    cfg.update(GPU_YAML)
    (path / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(path / "hf-datasets-cache"))
        yield path
