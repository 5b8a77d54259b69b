"""Chain of LoRA (COLA): train a link, tie a knot, extend the chain.

Xia, Qin, Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning",
arXiv:2401.04151. After M links the model is

    W = W0 + sum_{i=1..M} s_i B_i T_i A_i

where link i trains alone (earlier links frozen) between knots i-1 and i.

`ColaCallback` is a transformers TrainerCallback. At each knot it
- ties the knot: the current link's update s B T A joins the adapter's tied links, which are
  added into the float base weight (`base`) or kept beside it as frozen low-rank factors
  (`frozen`, exact; the only choice for 4-bit and 8-bit bases);
- extends the chain: a fresh link, drawn as the first one was (B = 0, so the knot leaves the
  model's function unchanged) from a generator seeded by (seed, knot, module) (`knot_generator`),
  so every data-parallel rank draws the same link; optionally at a new rank;
- gives the optimizer fresh state for the link's parameters.
The LR schedule is the run's own and goes on; `link_warmup_steps` adds a linear warmup after
each knot on top of it. Saves hold every link: the tied factors are adapter tensors and the
adapter config records their ranks (`cola_tied_ranks`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from .bnb import Linear4bit, Linear8bitLt
from .config import ChainLoraConfig
from .engines import DeepSpeedEngine, engine_of
from .layer import ChainLoraLayer, TiedFactor
from .log import LOG

COLA_MERGE_MODES = ("auto", "base", "frozen")
# DeepSpeed steps its optimizer and LR scheduler inside the backward pass, before any callback could scale the LR
LINK_WARMUP_UNDER_DEEPSPEED = (
    "cola_link_warmup_steps cannot act under DeepSpeed, which steps the optimizer and its LR scheduler inside the "
    "backward pass: remove cola_link_warmup_steps, or train without deepspeed (DDP or FSDP2)."
)


@dataclass(frozen=True)
class ColaSchedule:
    """A schedule of Chain of LoRA: M links, so M - 1 knots.

    Xia, Qin, Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning",
    arXiv:2401.04151 (https://arxiv.org/abs/2401.04151). Link i trains alone between knots i-1 and i;
    at the end W = W0 + sum_{i=1..M} s_i B_i T_i A_i.

    Each field is the axolotl YAML key without its `cola_` prefix.

    Args:
        links: the chain length M; 1 = no COLA.
        knots: the M - 1 knots, strictly increasing: fractions of the run's optimizer steps in (0, 1) or
            optimizer steps; default evenly spaced.
        ranks: the rank of each of the M links (rank step-down); default the adapter's r for every link.
        merge: where tied links go: `base` (added into the float base weights), `frozen` (frozen low-rank
            factors beside the base; exact, and the only choice for 4-bit and 8-bit bases) or `auto`
            (base for float32 bases, frozen otherwise).
        reset_optimizer: give the optimizer fresh state for each new link, as the paper does.
        link_warmup_steps: a linear LR warmup over this many steps after each knot, on top of the run's
            one schedule.

    Raises:
        ValueError: a setting that cannot make a chain, naming the YAML key and the fix.
    """

    links: int = 1
    knots: tuple[float | int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    merge: str = "auto"
    reset_optimizer: bool = True
    link_warmup_steps: int = 0

    def __post_init__(self):
        _check_schedule(self)

    def knot_steps(self, max_steps: int) -> list[int]:
        """The optimizer steps after which a knot is tied; default evenly spaced."""
        knots = self.knots or [index / self.links for index in range(1, self.links)]
        fractions = all(isinstance(knot, float) for knot in knots)
        # a fraction rounds half up: 5 epochs in 2 links tie after epoch 3, as in the paper
        steps = [int(knot * max_steps + 0.5) for knot in knots] if fractions else list(knots)
        if any(not 0 < step < max_steps for step in steps) or sorted(set(steps)) != steps:
            raise ValueError(
                f"cola_knots={list(knots)} gives knot steps {steps} for a run of {max_steps} steps: the knots must "
                f"fall on distinct steps between 1 and {max_steps - 1}. Lower cola_links or lengthen the run."
            )
        return steps


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_schedule(schedule: ColaSchedule) -> None:
    """Refuse a bad COLA schedule, naming the YAML key and the fix (the run's length: `knot_steps`)."""
    links, knots, ranks = schedule.links, schedule.knots, schedule.ranks
    if not _is_int(links) or links < 1:
        raise ValueError(f"cola_links={links!r} must be a positive integer (the chain length; 1 = no COLA).")
    if knots is not None:
        if len(knots) != links - 1:
            raise ValueError(
                f"cola_knots={list(knots)} has {len(knots)} knots, but cola_links={links} needs {links - 1}: "
                f"give {links - 1} knots or change cola_links."
            )
        fractions = all(isinstance(knot, float) and 0 < knot < 1 for knot in knots)
        steps = all(_is_int(knot) and knot >= 1 for knot in knots)
        if not (fractions or steps):
            raise ValueError(
                f"cola_knots={list(knots)} must be all fractions of the run strictly between 0 and 1 "
                "(e.g. [0.5, 0.8]) or all optimizer steps >= 1 (e.g. [100, 200])."
            )
        if list(knots) != sorted(set(knots)):
            raise ValueError(f"cola_knots={list(knots)} must be strictly increasing.")
    if ranks is not None:
        if len(ranks) != links or not all(_is_int(rank) and rank > 0 for rank in ranks):
            raise ValueError(
                f"cola_ranks={list(ranks)} must be {links} positive integers, one rank per link (cola_links={links})."
            )
        if any(later > earlier for earlier, later in zip(ranks, ranks[1:])):
            raise ValueError(
                f"cola_ranks={list(ranks)} must not increase: every link lives in the first link's tensors, a link "
                "of a lower rank zero-padded in them."
            )
        if len(set(ranks)) > 1 and not schedule.reset_optimizer:
            raise ValueError(
                "cola_reset_optimizer: false keeps the last link's optimizer moments, which would move the zero "
                "padding a lower-rank link lives in: set cola_reset_optimizer: true or give every link the same rank "
                "in cola_ranks."
            )
    if schedule.merge not in COLA_MERGE_MODES:
        raise ValueError(f"cola_merge={schedule.merge!r} must be one of {', '.join(COLA_MERGE_MODES)}.")
    if not _is_int(schedule.link_warmup_steps) or schedule.link_warmup_steps < 0:
        raise ValueError(f"cola_link_warmup_steps={schedule.link_warmup_steps!r} must be an integer >= 0.")


def knot_generator(seed: int, knot: int, module_name: str) -> torch.Generator:
    """The CPU generator that draws the link started at knot `knot` (1 for the first) in one module: seeded with
    the CRC-32 of "seed/knot/module_name", the same on every rank. It draws A, then the core's factors in order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{knot}/{module_name}".encode()))


def is_quantized(layer: ChainLoraLayer) -> bool:
    return isinstance(layer, (Linear4bit, Linear8bitLt))


class ColaCallback(TrainerCallback):
    """Chain of LoRA as a transformers TrainerCallback.

    Xia, Qin, Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning",
    arXiv:2401.04151 (https://arxiv.org/abs/2401.04151).

    Runs `schedule` on the chain adapter `adapter_name` of the trainer's PeftModel (a ChainLoraConfig;
    chain_type 'lora' for plain LoRA). After the optimizer step of each knot, every adapted layer ties
    its current link,

        W0 + sum_{j<i} s_j B_j T_j A_j  +=  s_i B_i T_i A_i,

    into the base weight or into frozen factors beside it, then starts link i+1 with B = 0, so the
    model's function is unchanged; the optimizer gets fresh state for the link's parameters.

    Args:
        schedule: the knots, ranks and merge mode.
        trainer: when given, receives each knot's event (`cola/link`, `cola/knot_step`,
            `cola/tied_update_norm`) through `trainer.log`, so tensorboard and wandb see it.
        adapter_name: the PEFT adapter to chain.

    Raises:
        TypeError: the adapter is not a chain adapter.
        ValueError: at the start of training, an adapter whose new links would not start at zero
            (`init_lora_weights=False`, `lora_bias`), `merge="base"` on a quantized base, or a checkpoint
            whose tied links do not match the schedule.
    """

    def __init__(self, schedule: ColaSchedule, trainer=None, adapter_name: str = "default"):
        self.schedule = schedule
        self.trainer = trainer
        self.adapter_name = adapter_name
        self.knot_steps: list[int] = []
        self.into_base = False
        self._scheduled_lrs: list[float] | None = None

    # ---- the model's side

    def _config(self, model) -> ChainLoraConfig:
        config = model.peft_config.get(self.adapter_name)
        if not isinstance(config, ChainLoraConfig):
            raise TypeError(
                f"COLA needs a chain adapter (ChainLoraConfig; chain_type='lora' for plain LoRA), but adapter "
                f"'{self.adapter_name}' is a {type(config).__name__}."
            )
        return config

    def _layers(self, model) -> dict[str, ChainLoraLayer]:
        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, ChainLoraLayer) and self.adapter_name in module.lora_core
        }

    def _ties_into_base(self, layers: dict[str, ChainLoraLayer]) -> bool:
        quantized = [name for name, layer in layers.items() if is_quantized(layer)]
        if self.schedule.merge == "base" and quantized:
            raise ValueError(
                f"cola_merge: base cannot add tied links into quantized weights ({quantized[0]}, ...): rounding "
                "to 4 or 8 bits would lose them. Use cola_merge: frozen (or auto)."
            )
        if self.schedule.merge != "auto":
            return self.schedule.merge == "base"
        # only float32 (or wider) weights take a small update without rounding it away
        return all(layer.get_base_layer().weight.dtype in (torch.float32, torch.float64) for layer in layers.values())

    # ---- training events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = self._config(model)
        layers = self._layers(model)
        if config.lora_bias or not config.init_lora_weights:
            raise ValueError(
                "COLA needs every new link to start at B = 0 without a bias, so that a knot leaves the model "
                "unchanged: set init_lora_weights to True or 'gaussian' and lora_bias to False."
            )
        self.knot_steps = self.schedule.knot_steps(state.max_steps)
        self.into_base = self._ties_into_base(layers)
        tied, done = len(config.cola_tied_ranks or []), sum(step <= state.global_step for step in self.knot_steps)
        if tied != done:
            raise ValueError(
                f"At step {state.global_step} the COLA schedule (knots after steps {self.knot_steps}) has tied "
                f"{done} links, but the adapter holds {tied}: resume with the cola_* keys of the run that wrote "
                "the checkpoint, and start a new COLA run from an adapter without tied links."
            )
        engine = engine_of([p for layer in layers.values() for p in link_parameters(layer, self.adapter_name)])
        if self.schedule.link_warmup_steps and isinstance(engine, DeepSpeedEngine):
            raise ValueError(LINK_WARMUP_UNDER_DEEPSPEED)
        if self.schedule.ranks and done:
            # a resumed run after a rank step-down: the link loaded zero-padded (layer.py) at the schedule's rank
            config.r = self.schedule.ranks[done]
            for layer in layers.values():
                layer.set_link_rank(self.adapter_name, config.r)
        if self.into_base:
            # a resumed run: the checkpoint's tied links go back into the base, as the knots put them
            for layer in layers.values():
                with engine.full(layer, [layer.get_base_layer().weight]):
                    layer.add_tied_to_base(self.adapter_name)
        LOG.info(
            "COLA: %d links, knots after steps %s, tied links %s",
            self.schedule.links,
            self.knot_steps,
            "added into the base weights" if self.into_base else "kept as frozen factors beside the base",
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.knot_steps:
            event = self.tie_knot(model, optimizer, state.global_step, args.seed)
            if self.trainer is not None:
                should_log = control.should_log
                self.trainer.log(event)
                control.should_log = should_log  # logging the event must not swallow this step's loss line

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        factor = self._link_warmup_factor(state.global_step)
        if factor < 1:
            self._scheduled_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # the schedule's own LR back before the scheduler steps
        if self._scheduled_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._scheduled_lrs):
                group["lr"] = lr
            self._scheduled_lrs = None

    def _link_warmup_factor(self, completed_steps: int) -> float:
        warmup = self.schedule.link_warmup_steps
        knots_done = [step for step in self.knot_steps if step <= completed_steps]
        if not warmup or not knots_done:
            return 1.0
        return min(1.0, (completed_steps - knots_done[-1] + 1) / (warmup + 1))

    # ---- the knot

    @torch.no_grad()
    def tie_knot(self, model, optimizer, step: int, seed: int) -> dict[str, float]:
        """Tie the current link, start the next one, reset the optimizer state; returns the knot event."""
        config = self._config(model)
        layers = self._layers(model)
        tied_ranks = list(config.cola_tied_ranks or [])
        # knot k (1 for the first) ties link k and starts link k + 1, whose rank is ranks[k] (0-based)
        knot = len(tied_ranks) + 1
        new_rank = self.schedule.ranks[knot] if self.schedule.ranks else None
        params = [p for layer in layers.values() for p in link_parameters(layer, self.adapter_name)]
        engine = engine_of(params)
        squared_norm = 0.0
        # one layer at a time, in the same order on every rank: FSDP2 and ZeRO-3 gather collectively
        for name, layer in layers.items():
            with engine.full(layer, self._rewritten_parameters(layer)):
                squared_norm += layer.tie_link(self.adapter_name, self.into_base)
                rank = new_rank or layer.r[self.adapter_name]
                layer.start_new_link(self.adapter_name, config, rank, knot_generator(seed, knot, name))
        engine.write_master(params)
        if optimizer is not None and self.schedule.reset_optimizer:
            engine.reset_state(optimizer, params)
        config.cola_tied_ranks = [*tied_ranks, config.r]
        config.r = new_rank or config.r
        event = {"cola/link": knot, "cola/knot_step": step, "cola/tied_update_norm": squared_norm**0.5}
        LOG.info("COLA knot after step %d: link %d tied (update norm %.4g), link %d started at rank %d",
                 step, knot, event["cola/tied_update_norm"], knot + 1, config.r)  # fmt: skip
        return event

    def _rewritten_parameters(self, layer: ChainLoraLayer) -> list[torch.nn.Parameter]:
        """What a knot rewrites in a layer: the link, and the base weight when the link is tied into it."""
        base = [layer.get_base_layer().weight] if self.into_base else []
        return link_parameters(layer, self.adapter_name) + base


def link_parameters(layer: ChainLoraLayer, adapter: str) -> list[torch.nn.Parameter]:
    """The current link's trainable parameters: A, B and the core's factors."""
    return [p for name in ("lora_A", "lora_B", "lora_core") for p in getattr(layer, name)[adapter].parameters()]


def copy_tied_links(model: torch.nn.Module, source: str, target: str) -> int:
    """Give adapter `target` the links tied into adapter `source` and kept beside the base, on every chain layer
    that holds both; returns how many layers got them.

    TRL's DPO, KTO and GRPO trainers, given a PeftModel and no reference model, make the reference a frozen copy of
    the policy's adapter: `add_adapter("ref", config)`, then a copy of each parameter. Tied links are buffers, so
    without this the reference of a continued COLA adapter would lack them.
    """
    layers = 0
    for module in model.modules():
        if isinstance(module, ChainLoraLayer) and source in module.lora_tied_A and target in module.lora_core:
            if source in module.tied_in_base:
                continue  # in the base weight, which the copy shares
            module.lora_tied_A[target] = TiedFactor(module.lora_tied_A[source].weight.clone())
            module.lora_tied_B[target] = TiedFactor(module.lora_tied_B[source].weight.clone())
            layers += 1
    return layers
