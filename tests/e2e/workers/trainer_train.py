"""Run under torchrun: train chain adapters with transformers' Trainer under DDP or DeepSpeed ZeRO-2/3 (gloo, CPU)
and save each with trainer.save_model into OUT_DIR/ENGINE/CHAIN_TYPE.

usage: trainer_train.py OUT_DIR CHAIN_TYPE[,CHAIN_TYPE...] ddp|zero2|zero3 [--steps N] [--cola MERGE]

The DeepSpeed engines need DS_ACCELERATOR=cpu in the environment (test_distributed.torchrun sets it).
--cola MERGE adds COLA with 3 links, knots after steps 2 and 4.
"""

import argparse

import torch
import torch.distributed as dist
from helpers import VOCAB, chain_model
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments

from axolotl_chainlora.cola import ColaCallback, ColaSchedule

# rank 3 makes every core factor 3 x 3: 9 elements, which ZeRO-3 splits unevenly between the 2 ranks (padding one)
RANK = 3
SEQUENCE = 9

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("chain_types")
parser.add_argument("engine", choices=["ddp", "zero2", "zero3"])
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--cola", choices=["base", "frozen", "auto"])
args = parser.parse_args()

deepspeed_config = None
if args.engine != "ddp":
    import deepspeed.ops

    # gloo does the collectives: skip the JIT C++ build of DeepSpeed's shared-memory op at init_distributed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed_config = {
        "zero_optimization": {"stage": int(args.engine[-1])},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    if args.engine == "zero3":
        # save_model then writes the full tensors, not each rank's empty placeholder
        deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True

# 6 steps of 2 sequences per rank; the sequential sampler and accelerate's sharding give each rank its own batches,
# so a shorter run trains on the first steps' batches of a longer one
generator = torch.Generator().manual_seed(0)
dataset = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (24, SEQUENCE), generator=generator)]

for chain_type in args.chain_types.split(","):
    out_dir = f"{args.out_dir}/{args.engine}/{chain_type}"
    training_args = TrainingArguments(
        output_dir=out_dir,
        deepspeed=deepspeed_config,
        use_cpu=True,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        seed=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        ddp_find_unused_parameters=False,
    )
    # tiny_llama seeds the base and the adapter's draws: every rank starts alike; CAUSAL_LM as axolotl sets it, so
    # merge_to_full_model loads the save onto a causal LM
    model = chain_model(chain_type, seed=None, chain_dims=None, r=RANK, task_type="CAUSAL_LM").train()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    if args.cola:
        trainer.add_callback(ColaCallback(ColaSchedule(links=3, knots=(2, 4), merge=args.cola), trainer))
    trainer.train()
    # the engine asked for ran: a silent fallback to DDP would make the tests' comparison vacuous
    engine = trainer.model_wrapped
    if deepspeed_config:
        assert engine.zero_optimization_stage() == deepspeed_config["zero_optimization"]["stage"], type(engine)
    else:
        assert isinstance(engine, DistributedDataParallel), type(engine)
    trainer.save_model(out_dir)

# a rank that leaves while its peer is still in a collective makes gloo abort the peer (ZeRO-3 did)
dist.barrier()
dist.destroy_process_group()
