"""axolotl's memory-efficient `merge-lora` on chain adapters: the plain-LoRA fold goes in.

axolotl's default merge (`merge_method: memory_efficient`) streams the base's shards and adds s B A read
straight from the adapter file, which would drop a chain adapter's core T and COLA's tied links. A chain
adapter is exactly the plain LoRA A' = T A, B' = B (`fold_to_lora`, in float64), so the efficient merge
gets that fold instead and applies unchanged, its NF4 round trip included: after 4-bit training the
merged weight is dequant(quant(W0)) + s B' A', the base the adapter was trained on, not W0.

axolotl before 0.21 rounds every weight through NF4 in that merge, the embeddings and the output head
too, which bitsandbytes never quantized in training: there the legacy merge (the adapter added to the
unquantized base, through the chain layers) stays the chain adapters' default.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import axolotl
import axolotl.cli.merge_lora as axolotl_merge_cli
import axolotl.cli.utils.lora_merge as axolotl_lora_merge
from packaging.version import Version

from .export import fold_to_lora, saved_chain_config
from .log import LOG

# axolotl's own merge, which this module wraps
axolotl_efficient_merge = axolotl_lora_merge.merge_lora_sharded_efficient
# whether that merge rounds through NF4 only the modules a 4-bit load quantizes
EFFICIENT_MERGE_MATCHES_4BIT_TRAINING = Version(axolotl.__version__).release >= (0, 21)


@functools.wraps(axolotl_efficient_merge)
def merge_folded(base_model_path, lora_adapter_path, output_path, *args, **kwargs):
    """axolotl's `merge_lora_sharded_efficient`, with a chain adapter replaced by its plain-LoRA fold."""
    if saved_chain_config(lora_adapter_path) is None:
        return axolotl_efficient_merge(base_model_path, lora_adapter_path, output_path, *args, **kwargs)
    with tempfile.TemporaryDirectory(prefix="chainlora-fold-") as tmp_dir:
        folded = fold_to_lora(lora_adapter_path, Path(tmp_dir) / "plain_lora")
        LOG.info("merge-lora: %s is a chain adapter: merging its exact plain-LoRA fold (A' = T A)", lora_adapter_path)
        return axolotl_efficient_merge(base_model_path, folded, output_path, *args, **kwargs)


def use_folding_merge() -> None:
    """Make `axolotl merge-lora`'s memory-efficient merge fold chain adapters first (`merge_folded`)."""
    for module in (axolotl_merge_cli, axolotl_lora_merge):
        if module.merge_lora_sharded_efficient is axolotl_efficient_merge:
            module.merge_lora_sharded_efficient = merge_folded
