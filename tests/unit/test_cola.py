"""Chain of LoRA (COLA): knots, tied links, new links, optimizer reset, rank step-down, saving and export.

The expected values come from outside the code under test: the logits just before a knot,
float64 sums of every link's s B T A written out here from the papers' formula (with the
reference core of helpers.py), plain PEFT loading the folded export, and a fresh optimizer of
the same class taking the same step.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from helpers import (
    ALPHA,
    VOCAB,
    chain_layers,
    chain_model,
    core_factors,
    knot,
    logits_of,
    randomize_adapters,
    reference_core,
    tiny_gpt2,
    tiny_llama,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from axolotl_chainlora import fold_to_lora
from axolotl_chainlora.cola import ColaCallback, ColaSchedule

CHAIN_TYPES = ["lora", "linchain", "moslora", "mtlora_icfm", "mtlora_dtsm"]
# the models below pass chain_dims=None: LinChain with its default r x r factors, which cola_ranks can step down


def link_deltas(model, chain_type: str) -> dict[str, torch.Tensor]:
    """Each layer's current link s B T A in float64, from its tensors and the papers' formula."""
    deltas = {}
    for name, layer in chain_layers(model).items():
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        core = layer.lora_core["default"].factors()
        T = reference_core(chain_type, core) if chain_type != "lora" else torch.eye(A.shape[0], dtype=A.dtype)
        deltas[name] = layer.scaling["default"] * B @ T @ A
    return deltas


# ---------------------------------------------------------------- a knot keeps the model's function


@pytest.mark.parametrize("merge", ["base", "frozen"])
@pytest.mark.parametrize("chain_type", CHAIN_TYPES)
def test_knot_leaves_the_logits_unchanged_and_starts_a_fresh_link(chain_type, merge, input_ids):
    model = chain_model(chain_type, chain_dims=None)
    before = logits_of(model, input_ids)
    assert (before - logits_of(tiny_llama(), input_ids)).abs().max() > 1e-2  # the link matters
    old_A = {name: layer.lora_A["default"].weight.clone() for name, layer in chain_layers(model).items()}
    knot(model, merge)
    after = logits_of(model, input_ids)
    diff = (after - before).abs().max().item()
    print(f"{chain_type} {merge}: logits across a knot, float32: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    for name, layer in chain_layers(model).items():
        assert layer.lora_B["default"].weight.abs().max() == 0, name  # the new link starts at B = 0
        assert not torch.equal(layer.lora_A["default"].weight, old_A[name]), name  # with a new A
        assert (name in [n for n, lay in chain_layers(model).items() if "default" in lay.tied_in_base]) == (
            merge == "base"
        )
    assert model.peft_config["default"].cola_tied_ranks == [4]


def test_base_merge_changes_the_base_weights_and_frozen_keeps_them(input_ids):
    for merge in ("base", "frozen"):
        model = chain_model("linchain", chain_dims=None)
        expected = link_deltas(model, "linchain")
        base_before = {name: layer.get_base_layer().weight.clone() for name, layer in chain_layers(model).items()}
        knot(model, merge)
        for name, layer in chain_layers(model).items():
            change = layer.get_base_layer().weight.double() - base_before[name].double()
            if merge == "base":
                torch.testing.assert_close(change, expected[name], atol=1e-6, rtol=0)
            else:
                assert torch.equal(layer.get_base_layer().weight, base_before[name])
                tied = layer.lora_tied_B["default"].weight.double() @ layer.lora_tied_A["default"].weight.double()
                torch.testing.assert_close(tied, expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("chain_type", ["lora", "linchain"])
def test_with_frozen_links_the_disabled_adapter_stays_the_base_model_after_knots(chain_type, input_ids):
    """TRL's reference for an adapter run (DPO, IPO, KTO) is the policy with its adapter disabled: after knots that
    keep the links frozen it is still the base model the run started from (a fresh copy, independent of the
    adapter); links tied into the base (the negative control) move it to the policy."""
    base_logits = logits_of(tiny_llama(), input_ids)
    for merge in ("frozen", "base"):
        model = chain_model(chain_type, chain_dims=None)
        for step in (1, 2):
            knot(model, merge, step=step)
            randomize_adapters(model, seed=step)  # the new link trains
        with model.disable_adapter():
            reference = logits_of(model, input_ids)
        diff = (reference - base_logits).abs().max().item()
        print(f"{chain_type} {merge}: disabled adapter vs base after two knots: max abs diff {diff:.2e}")
        assert diff == 0 if merge == "frozen" else diff > 1e-2


@pytest.mark.parametrize("merge", ["base", "frozen"])
def test_fused_qkv_knot_is_exact(merge, input_ids):
    model = chain_model(
        "mtlora_icfm", tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True, chain_fused_splits={"c_attn": 3}
    )
    before = logits_of(model, input_ids)
    knot(model, merge)
    assert (logits_of(model, input_ids) - before).abs().max() <= 1e-5


def test_links_kept_frozen_go_into_the_base_with_a_later_base_tie(input_ids):
    model = chain_model("linchain", chain_dims=None)
    before = logits_of(model, input_ids)
    knot(model, "frozen")
    randomize_adapters(model, seed=4)  # a trained second link
    second = logits_of(model, input_ids)
    assert (second - before).abs().max() > 1e-2
    knot(model, "base")
    assert (logits_of(model, input_ids) - second).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="are in the base weight: tie the next one there too"):
        knot(model, "frozen")


def test_bf16_base_loses_part_of_the_update_when_merged_and_auto_keeps_it_frozen(input_ids):
    """The measured reason `cola_merge: auto` keeps the links of a bf16 base frozen beside it."""
    diffs = {}
    for merge in ("base", "frozen", "auto"):
        model = chain_model("linchain", base=tiny_llama().to(torch.bfloat16), seed=5, chain_dims=None)
        with torch.no_grad():  # an update ~1% of the weights, as after some training
            for layer in chain_layers(model).values():
                layer.lora_B["default"].weight.mul_(0.02)
        before = logits_of(model, input_ids)
        callback = knot(model, merge)
        diffs[merge] = (logits_of(model, input_ids) - before).abs().max().item()
        assert callback.into_base == (merge == "base")
    print(f"bf16 base, logits across a knot: base merge {diffs['base']:.3e}, frozen {diffs['frozen']:.3e}")
    assert diffs["frozen"] == 0.0
    assert diffs["base"] > 1e-3


def test_4bit_base_ties_frozen_and_refuses_base(tmp_path, input_ids):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    tiny_llama(hidden_size=64).save_pretrained(tmp_path)  # bitsandbytes' 4-bit blocks need 64 inputs
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    model = chain_model("linchain", base=base, chain_dims=None)
    before = logits_of(model, input_ids)
    callback = knot(model, "auto")
    assert callback.into_base is False
    diff = (logits_of(model, input_ids) - before).abs().max().item()
    print(f"4-bit NF4 base, frozen tie: logits across a knot max abs diff {diff:.2e}")
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="cola_merge: base cannot add tied links into quantized weights"):
        knot(model, "base")


# ---------------------------------------------------------------- every link is kept, saved and exported


def train_with_cola(tmp_path, chain_type: str, schedule: ColaSchedule, record=None, steps: int = 9, **config):
    model = chain_model(chain_type, seed=None, chain_dims=None, **config)
    ids = torch.randint(0, VOCAB, (64, 10), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.add_callback(ColaCallback(schedule, trainer))
    if record is not None:
        trainer.add_callback(record)
    trainer.train()
    return model.eval(), trainer


class RecordLinks(TrainerCallback):
    """Keeps each link's float64 s B T A as it is tied (after the knot step's update), and every step's LR."""

    def __init__(self, chain_type: str, knot_steps: list[int]):
        self.chain_type, self.knot_steps = chain_type, knot_steps
        self.links: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.knot_steps:  # this step ends in a knot
            self.links.append(link_deltas(model, self.chain_type))


@pytest.mark.parametrize("chain_type", ["lora", "mtlora_ctcm"])
def test_saved_adapter_holds_every_link_and_folds_to_plain_lora(tmp_path, chain_type, input_ids):
    record = RecordLinks(chain_type, [3, 6])
    model, _ = train_with_cola(tmp_path, chain_type, ColaSchedule(links=3, knots=(3, 6), merge="frozen"), record)
    final = link_deltas(model, chain_type)
    assert len(record.links) == 2
    model.save_pretrained(tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert reloaded.peft_config["default"].cola_tied_ranks == [4, 4]
    merged = reloaded.merge_and_unload()
    base = tiny_llama()
    for name in chain_layers(model):
        module = name.removeprefix("base_model.model.")
        assert saved[f"{name}.lora_tied_A.weight"].shape[0] == 8  # both tied links, rank 4 each
        # the whole update: tied link 1 + tied link 2 + the current link, summed here in float64
        expected = record.links[0][name] + record.links[1][name] + final[name]
        got = merged.get_submodule(module).weight.double() - base.get_submodule(module).weight.double()
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0, msg=name)

    fold_to_lora(tmp_path / "adapter", tmp_path / "plain")
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    assert type(plain.peft_config["default"]) is LoraConfig and plain.peft_config["default"].r == 12
    assert not plain.peft_config["default"].rank_pattern
    diff = (logits_of(plain, input_ids) - logits_of(model, input_ids)).abs().max().item()
    print(f"{chain_type}: plain-LoRA fold of rank 12 (3 links) vs the trained model: {diff:.2e}")
    assert diff <= 1e-5
    assert (logits_of(reloaded, input_ids) - logits_of(model, input_ids)).abs().max() <= 1e-5


def test_rank_step_down_pads_each_link_and_saves_it_at_its_own_rank(tmp_path, input_ids):
    schedule = ColaSchedule(links=3, knots=(3, 6), ranks=(4, 2, 2), merge="base")
    model, trainer = train_with_cola(tmp_path, "linchain", schedule)
    config = model.peft_config["default"]
    assert (config.r, config.cola_tied_ranks) == (2, [4, 2])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trainable == in_optimizer  # the optimizer trains exactly the current link's (unchanged) tensors
    for name, layer in chain_layers(model).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape[0] == 4 and layer.scaling["default"] == 8 / 2, name
        # the rank-2 link sits in the first 2 of 4 ranks; the padding stayed exactly zero through training
        assert A[2:].abs().max() == 0 and B[:, 2:].abs().max() == 0, name
        for factor in layer.lora_core["default"].factors():
            assert factor[2:].abs().max() == 0 and factor[:, 2:].abs().max() == 0, name
        assert B.abs().max() > 0, name  # the last link trained
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # the file holds what a true rank-2 link writes
    assert {t.shape[0] for k, t in saved.items() if ".lora_A." in k} == {2}
    assert {t.shape[1] for k, t in saved.items() if ".lora_B." in k} == {2}
    assert {tuple(t.shape) for k, t in saved.items() if ".lora_core." in k} == {(2, 2)}
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    # base merge in training, tied factors on reload: the same function
    assert (logits_of(reloaded, input_ids) - logits_of(model, input_ids)).abs().max() <= 1e-5


PADDED_CASES = [*CHAIN_TYPES, "mtlora_shim", "mtlora_ctcm"]


def train_steps(model, steps: int = 4) -> None:
    """AdamW with weight decay on fixed batches: the padding must stay zero under both."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def padded_and_true_links(chain_type: str, init: str, **config):
    """A rank-2 link drawn zero-padded into rank-4 tensors, and a true rank-2 adapter given its trimmed tensors."""
    padded = chain_model(chain_type, seed=None, chain_dims=None, chain_init=init, lora_dropout=0.0, **config)
    padded_config = padded.peft_config["default"]
    for name, layer in chain_layers(padded).items():
        layer.start_new_link("default", padded_config, 2, torch.Generator().manual_seed(zlib.crc32(name.encode())))
        with torch.no_grad():  # a trained B, so that every factor gets a gradient
            layer.lora_B["default"].weight[:, :2].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    true = chain_model(chain_type, seed=None, chain_dims=None, chain_init=init, lora_dropout=0.0, r=2, **config)
    copy_trimmed(padded, true)
    return padded, true


def copy_trimmed(padded, true) -> None:
    """The true adapter's tensors := the padded one's, cut to rank 2 (first two rows of A, columns of B, the core's
    top-left block), written out here rather than taken from the code under test."""
    true_layers = chain_layers(true)
    with torch.no_grad():
        for name, layer in chain_layers(padded).items():
            other = true_layers[name]
            other.lora_A["default"].weight.copy_(layer.lora_A["default"].weight[:2])
            other.lora_B["default"].weight.copy_(layer.lora_B["default"].weight[:, :2])
            for mine, theirs in zip(layer.lora_core["default"].factors(), other.lora_core["default"].factors()):
                theirs.copy_(mine[:2, :2])


def trimmed_difference(padded, true) -> float:
    worst = 0.0
    for name, layer in chain_layers(padded).items():
        other = chain_layers(true)[name]
        pairs = [(layer.lora_A["default"].weight[:2], other.lora_A["default"].weight),
                 (layer.lora_B["default"].weight[:, :2], other.lora_B["default"].weight)]  # fmt: skip
        pairs += [
            (m[:2, :2], t) for m, t in zip(layer.lora_core["default"].factors(), other.lora_core["default"].factors())
        ]
        worst = max(worst, *((a - b).abs().max().item() for a, b in pairs))
    return worst


@pytest.mark.parametrize("init", ["kaiming", "identity", "orthogonal"])
@pytest.mark.parametrize("chain_type", PADDED_CASES)
def test_a_zero_padded_link_trains_as_a_link_of_its_own_rank(chain_type, init, input_ids):
    padded, true = padded_and_true_links(chain_type, init)
    # the draw itself: a rank-2 link drawn from the same generator, padded with zeros
    for name, layer in chain_layers(padded).items():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        A = torch.empty(2, layer.in_features)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        assert torch.equal(layer.lora_A["default"].weight[:2], A) and layer.lora_A["default"].weight[2:].eq(0).all()
    train_steps(padded)
    train_steps(true)
    diff = trimmed_difference(padded, true)
    print(f"{chain_type}/{init}: padded rank-2 link vs a true rank-2 link after 4 AdamW steps: {diff:.2e}")
    assert diff <= 1e-6
    for layer in chain_layers(padded).values():
        tensors = [layer.lora_A["default"].weight[2:], layer.lora_B["default"].weight[:, 2:]]
        tensors += [f[2:] for f in layer.lora_core["default"].factors()] + [
            f[:, 2:] for f in layer.lora_core["default"].factors()
        ]
        assert all(t.eq(0).all() for t in tensors)  # exactly zero, weight decay included
    assert (logits_of(padded, input_ids) - logits_of(true, input_ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("chain_type", ["moslora", "linchain"])
def test_padding_left_non_zero_trains_another_link(chain_type):
    """Negative control: a step-down that kept the old core in the padding trains a different link."""
    padded, true = padded_and_true_links(chain_type, "kaiming")
    with torch.no_grad():
        for layer in chain_layers(padded).values():
            layer.lora_core["default"].factors()[0][2:].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    train_steps(padded)
    train_steps(true)
    assert trimmed_difference(padded, true) > 1e-3


def test_a_padded_fused_link_trains_as_a_fused_link_of_its_own_rank(input_ids):
    """GPT-2's fused qkv: each of the three slices holds its rank-2 block in the first 2 of its 4 ranks."""
    config = dict(target_modules=["c_attn"], chain_fused_splits={"c_attn": 3}, fan_in_fan_out=True)
    padded = chain_model("mtlora_shim", base=tiny_gpt2(), seed=None, lora_dropout=0.0, **config)
    padded_config = padded.peft_config["default"]
    true = chain_model("mtlora_shim", base=tiny_gpt2(), seed=None, lora_dropout=0.0, r=2, **config)
    for module in [*padded.modules(), *true.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # GPT-2's own dropout: its masks are not what this test compares
    true_layers = chain_layers(true)
    positions = torch.tensor([0, 1, 4, 5, 8, 9])  # written out: slice g's first two of four ranks
    with torch.no_grad():
        for name, layer in chain_layers(padded).items():
            layer.start_new_link("default", padded_config, 2, torch.Generator().manual_seed(7))
            layer.lora_B["default"].weight[:, :2].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
            other = true_layers[name]
            other.lora_A["default"].weight.copy_(layer.lora_A["default"].weight[positions])
            other.lora_B["default"].weight.copy_(layer.lora_B["default"].weight[:, :2])
            other.lora_core["default"].weight.copy_(layer.lora_core["default"].weight[positions][:, positions])
    train_steps(padded)
    train_steps(true)
    for name, layer in chain_layers(padded).items():
        other = true_layers[name]
        torch.testing.assert_close(layer.lora_A["default"].weight[positions], other.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B["default"].weight[:, :2], other.lora_B["default"].weight)
        core = layer.lora_core["default"].weight
        torch.testing.assert_close(core[positions][:, positions], other.lora_core["default"].weight)
        padding = torch.ones_like(core, dtype=torch.bool)
        padding[positions.unsqueeze(1), positions] = False
        assert core[padding].eq(0).all()  # the rest stayed exactly zero
    assert (logits_of(padded, input_ids) - logits_of(true, input_ids)).abs().max() <= 1e-5


def test_a_fused_rank_step_down_saves_reloads_and_folds_as_true_rank_links(tmp_path, input_ids):
    """GPT-2's fused qkv with knots stepping the rank 4 -> 2: the file holds rank-2 fused tensors (A 3*2 rows, B 2
    columns, cores 6 x 6), which plain PEFT (after the fold) and the chain layers reload with the model's logits."""
    config = dict(target_modules=["c_attn"], chain_fused_splits={"c_attn": 3}, fan_in_fan_out=True)
    model = chain_model("mtlora_icfm", base=tiny_gpt2(), seed=None, lora_dropout=0.0, **config)
    for step in (1, 2):
        randomize_adapters(model, seed=step)  # a trained link to tie, padding included: the knot must cut it
        knot(model, "frozen", step=step, ranks=(4, 2, 2))
        with torch.no_grad():  # the new rank-2 link trained a little (in its own rows and columns only)
            for layer in chain_layers(model).values():
                layer.lora_B["default"].weight[:, :2].normal_(0, 0.3, generator=torch.Generator().manual_seed(step))
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tuple(t.shape) for k, t in saved.items() if ".lora_A." in k} == {(6, 32)}
    assert {tuple(t.shape) for k, t in saved.items() if ".lora_B." in k} == {(96, 2)}
    assert {tuple(t.shape) for k, t in saved.items() if ".lora_core." in k} == {(6, 6)}
    assert {t.shape[0] for k, t in saved.items() if ".lora_tied_A." in k} == {3 * 4 + 3 * 2}
    expected = logits_of(model, input_ids)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    assert (logits_of(reloaded, input_ids) - expected).abs().max() <= 1e-5
    fold_to_lora(tmp_path / "adapter", tmp_path / "plain")
    plain = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "plain").eval()
    assert (logits_of(plain, input_ids) - expected).abs().max() <= 1e-5


class RecordScaling(TrainerCallback):
    """Each adapted layer's scaling just after each knot (added after the ColaCallback, so it runs after it)."""

    def __init__(self, knot_steps: list[int]):
        self.knot_steps = knot_steps
        self.after_knots: list[set[float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.knot_steps:
            self.after_knots.append({layer.scaling["default"] for layer in chain_layers(model).values()})


def test_rslora_rank_step_down_scales_each_new_link_by_alpha_over_sqrt_r_and_folds_exactly(tmp_path, input_ids):
    record = RecordScaling([3, 6])
    schedule = ColaSchedule(links=3, knots=(3, 6), ranks=(4, 2, 2), merge="frozen")
    model, _ = train_with_cola(tmp_path, "linchain", schedule, record, use_rslora=True)
    # rsLoRA (Kalajdzievski, arXiv:2312.03732): s = alpha / sqrt(r) = 8 / sqrt(2); LoRA's alpha / r would be 4
    assert record.after_knots == [{ALPHA / math.sqrt(2)}] * 2

    model.save_pretrained(tmp_path / "adapter")
    fold_to_lora(tmp_path / "adapter", tmp_path / "plain")
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    config = plain.peft_config["default"]
    assert type(config) is LoraConfig and (config.r, config.use_rslora) == (8, True)  # one plain LoRA of rank 4 + 2 + 2
    diff = (logits_of(plain, input_ids) - logits_of(model, input_ids)).abs().max().item()
    assert diff <= 1e-5, diff


def documented_draw(seed: int, knot: int, module: str, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The link a knot starts, as docs/cola.md describes it: a CPU generator seeded with the CRC-32 of
    "seed/knot/module" draws A and then the core's factors in order, each Kaiming-uniform with a = sqrt(5) in
    float32, as nn.Linear and LoRA's A are drawn."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{knot}/{module}".encode()))
    draws = []
    for shape in shapes:
        draw = torch.empty(shape)
        torch.nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator)
        draws.append(draw)
    return draws


def test_each_new_link_is_a_fresh_draw_of_its_own_seed():
    model = chain_model("linchain", seed=None, chain_dims=None)  # per layer: A and three 4 x 4 factors
    links = {}  # knot 1 starts link 2, knot 2 link 3
    for number in (1, 2):
        knot(model, "frozen", step=number)
        links[number] = {
            name: [layer.lora_A["default"].weight.detach().clone(), *(f.detach().clone() for f in core_factors(layer))]
            for name, layer in chain_layers(model).items()
        }
        assert all(layer.lora_B["default"].weight.abs().max() == 0 for layer in chain_layers(model).values())
    assert len(links[1]) == 2 * 3  # two decoder layers, three targets
    for name in links[1]:
        for previous, new in zip(links[1][name], links[2][name]):
            assert not torch.equal(previous, new), name
        for number in (1, 2):
            expected = documented_draw(0, number, name, [tuple(t.shape) for t in links[number][name]])
            for got, want in zip(links[number][name], expected):
                torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name}, knot {number}")


def test_link_warmup_ramps_the_lr_after_each_knot(tmp_path):
    record = RecordLinks("linchain", [3, 6])
    schedule = ColaSchedule(links=3, knots=(3, 6), link_warmup_steps=2)
    train_with_cola(tmp_path, "linchain", schedule, record)
    # constant LR 1e-2: steps 4-5 and 7-8 warm up (1/3, 2/3), everything else at the schedule's LR
    expected = [1e-2] * 3 + [1e-2 / 3, 2e-2 / 3] + [1e-2] + [1e-2 / 3, 2e-2 / 3] + [1e-2]
    # RecordLinks runs after ColaCallback: it sees the LR the optimizer steps with
    assert record.lrs == pytest.approx(expected)


# ---------------------------------------------------------------- optimizer reset


def bnb_optimizer(name):
    import bitsandbytes as bnb

    return lambda params, lr: getattr(bnb.optim, name)(params, lr=lr, min_8bit_size=16)


OPTIMIZERS = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=0.1),
    "bnb-adamw8bit": bnb_optimizer("AdamW8bit"),
    "bnb-paged-adamw": bnb_optimizer("PagedAdamW"),
}


def set_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_first_update_after_a_knot_equals_a_fresh_optimizers(name):
    make = OPTIMIZERS[name]
    model = chain_model("linchain", seed=None, chain_dims=None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make(params, 1e-2)
    for step in range(3):  # state to reset
        set_grads(params, step)
        optimizer.step()
    assert any(optimizer.state[p] for p in params)
    knot(model, "frozen", optimizer)
    assert all(not optimizer.state[p] or name == "adagrad" for p in params)

    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = make(fresh_params, 1e-2)
    set_grads(params, 99)
    set_grads(fresh_params, 99)
    optimizer.step()
    fresh.step()
    for param, expected in zip(params, fresh_params):
        assert torch.equal(param, expected)


def test_cola_refuses_an_adapter_whose_new_links_would_not_start_at_zero(tmp_path):
    with pytest.raises(ValueError, match="every new link to start at B = 0"):
        train_with_cola(tmp_path, "linchain", ColaSchedule(links=2), init_lora_weights=False)


def test_resume_with_other_knots_is_refused(tmp_path):
    model = chain_model("linchain", seed=None, chain_dims=None)
    knot(model, "frozen")  # one tied link, as a checkpoint after the first knot holds
    callback = ColaCallback(ColaSchedule(links=3, knots=(5, 8)))

    class State:
        max_steps, global_step = 10, 4

    with pytest.raises(ValueError, match=r"has tied 0 links, but the adapter holds 1"):
        callback.on_train_begin(None, State(), None, model=model)
    State.global_step = 9
    with pytest.raises(ValueError, match=r"has tied 2 links, but the adapter holds 1"):
        callback.on_train_begin(None, State(), None, model=model)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"links": 0}, r"cola_links=0 must be a positive integer"),
        ({"links": 3, "knots": (0.5,)}, r"cola_knots=\[0.5\] has 1 knots, but cola_links=3 needs 2"),
        ({"links": 3, "knots": (0.8, 0.5)}, r"must be strictly increasing"),
        ({"links": 3, "knots": (0.5, 0.5)}, r"must be strictly increasing"),
        ({"links": 3, "knots": (0.5, 1.0)}, r"all fractions of the run strictly between 0 and 1"),
        ({"links": 3, "knots": (0, 5)}, r"all fractions of the run strictly between 0 and 1"),
        ({"links": 3, "knots": (0.5, 5)}, r"all fractions of the run strictly between 0 and 1"),
        ({"links": 3, "knots": (True, 5)}, r"all fractions of the run strictly between 0 and 1"),
        ({"links": 3, "ranks": (8, 4)}, r"cola_ranks=\[8, 4\] must be 3 positive integers"),
        ({"links": 2, "ranks": (8, 0)}, r"cola_ranks=\[8, 0\] must be 2 positive integers"),
        ({"links": 2, "ranks": (8, 4), "reset_optimizer": False}, r"set cola_reset_optimizer: true"),
        ({"links": 2, "merge": "disk"}, r"cola_merge='disk' must be one of auto, base, frozen"),
        ({"links": 2, "link_warmup_steps": -1}, r"cola_link_warmup_steps=-1 must be an integer >= 0"),
    ],
)
def test_bad_schedules_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ColaSchedule(**settings)


def test_knot_steps_are_checked_against_the_run():
    assert ColaSchedule(links=2).knot_steps(5) == [3]  # 5 epochs, 2 links: epochs 1-3, then 4-5 (the paper)
    assert ColaSchedule(links=3, knots=(0.5, 0.8)).knot_steps(10) == [5, 8]
    assert ColaSchedule(links=3, knots=(4, 8)).knot_steps(10) == [4, 8]
    with pytest.raises(ValueError, match=r"cola_knots=\[4, 10\] gives knot steps \[4, 10\] for a run of 10 steps"):
        ColaSchedule(links=3, knots=(4, 10)).knot_steps(10)
    with pytest.raises(ValueError, match=r"knot steps \[1, 1\] for a run of 2 steps"):
        ColaSchedule(links=3, knots=(0.3, 0.4)).knot_steps(2)
