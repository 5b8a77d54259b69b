"""The reference model of TRL's preference trainers for a chain adapter, built by TRL itself.

Given a PeftModel and no reference model (axolotl's adapter runs), TRL's DPO, KTO and GRPO trainers make the reference
a frozen copy of the policy's starting adapter: `add_adapter("ref", config)` and a copy of every parameter whose name
holds ".default.". The cores are parameters and come along; the links COLA tied are buffers and do not, so the plugin
copies them in `post_trainer_create`. The reference must compute what the policy computed before the trainer existed.
"""

from __future__ import annotations

import pytest
import torch
from axolotl.utils.dict import DictDefault
from datasets import Dataset
from helpers import chain_config, chain_layers, knot, logits_of, randomize_adapters
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.trainer.utils import use_adapter

from axolotl_chainlora import ChainLoraPlugin
from axolotl_chainlora.plugin import TRL_REFERENCE_ADAPTER

CHAIN_TYPES = ["lora", "linchain", "moslora", "mtlora_icfm", "mtlora_ctcm", "mtlora_dtsm"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
EXAMPLES = {
    DPOTrainer: [{"prompt": "### Instruction:\nsort 3 1 2\n\n### Response:\n", "chosen": "1 2 3", "rejected": "3 2 1"}],
    KTOTrainer: [
        {"prompt": "### Instruction:\nsort 3 1 2\n\n### Response:\n", "completion": "1 2 3", "label": True},
        {"prompt": "### Instruction:\nsort 2 1\n\n### Response:\n", "completion": "2 1", "label": False},
    ],
}
ARGS = {DPOTrainer: DPOConfig, KTOTrainer: KTOConfig}


@pytest.fixture(scope="module")
def probe(demo_dir) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    texts = ["### Instruction:\nsort 5 4\n\n### Response:\n4 5", "### Instruction:\nhi"]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def starting_policy(demo_dir, chain_type: str, tied_link: bool):
    """A chain adapter as a continued run starts it (lora_model_dir): every tensor non-zero, with a link COLA tied."""
    base = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    model = get_peft_model(base, chain_config(chain_type, target_modules=TARGETS, chain_dims=None))
    randomize_adapters(model, seed=3)
    if tied_link:
        knot(model, "frozen")
        randomize_adapters(model, seed=5)  # the new link too
    return model


def build_trainer(trainer_class, model, demo_dir, tmp_path):
    args = ARGS[trainer_class](output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                               per_device_train_batch_size=2)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    dataset = Dataset.from_list(EXAMPLES[trainer_class] * 2)
    return trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def reference_logits(model, probe) -> torch.Tensor:
    with use_adapter(model, TRL_REFERENCE_ADAPTER):
        return logits_of(model, probe)


def cfg_for(chain_type: str) -> DictDefault:
    if chain_type == "lora":  # COLA on plain LoRA: chain layers of chain_type 'lora'
        return DictDefault(adapter="lora", cola_links=2, rl="dpo")
    return DictDefault(adapter=chain_type.split("_")[0], rl="dpo")


@pytest.mark.parametrize("trainer_class", [DPOTrainer, KTOTrainer], ids=["dpo", "kto"])
@pytest.mark.parametrize("chain_type", CHAIN_TYPES)
def test_the_reference_is_the_starting_adapter_every_core_and_tied_link_included(
    demo_dir, probe, tmp_path, chain_type, trainer_class
):
    model = starting_policy(demo_dir, chain_type, tied_link=True)
    start = logits_of(model, probe)  # before TRL copies anything
    with model.disable_adapter():
        assert (start - logits_of(model, probe)).abs().max() > 1e-2  # the adapter matters
    trainer = build_trainer(trainer_class, model, demo_dir, tmp_path)
    assert TRL_REFERENCE_ADAPTER in model.peft_config
    # the control: TRL's copy alone leaves the tied links out
    assert (reference_logits(model, probe) - start).abs().max() > 1e-2
    ChainLoraPlugin().post_trainer_create(cfg_for(chain_type), trainer)
    diff = (reference_logits(model, probe) - start).abs().max().item()
    print(f"{chain_type}: TRL's reference vs the starting policy: {diff:.1e}")
    assert diff <= 1e-6
    for name, layer in chain_layers(model).items():  # every core factor came along, equal
        for policy_factor, reference_factor in zip(
            layer.lora_core["default"].parameters(), layer.lora_core[TRL_REFERENCE_ADAPTER].parameters(), strict=True
        ):
            assert torch.equal(policy_factor, reference_factor), name
    # the policy is untouched: it still computes what it started with
    assert (logits_of(model, probe) - start).abs().max() <= 1e-6


def test_without_tied_links_trls_copy_is_already_the_starting_adapter(demo_dir, probe, tmp_path):
    """A continued chain adapter that COLA never tied: the cores are parameters, so TRL's copy is exact alone."""
    model = starting_policy(demo_dir, "linchain", tied_link=False)
    start = logits_of(model, probe)
    build_trainer(DPOTrainer, model, demo_dir, tmp_path)
    assert (reference_logits(model, probe) - start).abs().max() <= 1e-6
