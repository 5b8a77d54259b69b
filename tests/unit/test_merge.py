"""axolotl's memory-efficient merge (`merge_lora_sharded_efficient`) on chain adapters, in process.

The merged model, loaded by transformers, must give the chain adapter's logits: LinChain, MTLoRA on
GPT-2's fused c_attn (Conv1D, fan_in_fan_out, rank 3 r after the fold, with rsLoRA) and a COLA adapter
with tied links. The negative control is axolotl's merge of the same folder without the fold, which
adds s B A from the file and misses the core (or, for a fused projection, fails).
"""

from __future__ import annotations

import pytest
import torch
from helpers import chain_model, logits_of, make_input_ids, randomize_adapters
from transformers import AutoModelForCausalLM

pytest.importorskip("axolotl", reason="the axolotl extra is not installed")

from axolotl_chainlora.cola import ColaCallback, ColaSchedule  # noqa: E402
from axolotl_chainlora.merge import axolotl_efficient_merge, merge_folded  # noqa: E402

MAX_LOGIT_DIFF = 1e-5
CASES = {
    "linchain": ("llama", "linchain", {}),
    "gpt2-fused-mtlora-rslora": (
        "gpt2",
        "mtlora_icfm",
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "chain_fused_splits": {"c_attn": 3},
         "use_rslora": True},
    ),  # fmt: skip
    "cola-linchain-tied-links": ("llama", "linchain", {"chain_dims": None}),
}


@pytest.fixture(scope="module")
def saved_chains(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory) -> dict[str, tuple[str, str, torch.Tensor]]:
    """Each case saved: (base dir, adapter dir, the adapter's logits)."""
    root = tmp_path_factory.mktemp("merge-chains")
    saved = {}
    for name, (base_name, chain_type, fields) in CASES.items():
        base_dir = tiny_llama_dir if base_name == "llama" else tiny_gpt2_dir
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = chain_model(chain_type, base, task_type="CAUSAL_LM", **fields)
        if name.startswith("cola"):
            knot = ColaCallback(ColaSchedule(links=2, merge="frozen"))
            knot.tie_knot(model, None, step=1, seed=0)
            randomize_adapters(model, seed=5)  # the second link trains
        model.save_pretrained(root / name)
        saved[name] = (base_dir, str(root / name), logits_of(model, make_input_ids()))
    return saved


def merged_logits(out_dir) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(out_dir).eval(), make_input_ids())


@pytest.mark.parametrize("name", list(CASES))
def test_the_efficient_merge_of_the_fold_gives_the_chain_adapters_logits(saved_chains, tmp_path, name):
    base_dir, adapter_dir, chain_logits = saved_chains[name]
    merge_folded(base_model_path=base_dir, lora_adapter_path=adapter_dir, output_path=tmp_path / "folded")
    diff = (merged_logits(tmp_path / "folded") - chain_logits).abs().max().item()
    print(f"{name}: efficient merge of the fold vs chain adapter logits: max abs diff {diff:.2e}")
    assert diff <= MAX_LOGIT_DIFF

    if name.startswith("gpt2-fused"):
        # a fused projection's saved B holds its slices side by side: they do not multiply as one plain LoRA
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            axolotl_efficient_merge(base_model_path=base_dir, lora_adapter_path=adapter_dir, output_path=tmp_path / "raw")
        return
    axolotl_efficient_merge(base_model_path=base_dir, lora_adapter_path=adapter_dir, output_path=tmp_path / "raw")
    raw = (merged_logits(tmp_path / "raw") - chain_logits).abs().max().item()
    print(f"{name}: axolotl's efficient merge of the chain adapter folder itself: max abs diff {raw:.2e}")
    assert raw > 1e-2
