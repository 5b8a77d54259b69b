"""Export a chain adapter to what every LoRA tool reads.

`fold_to_lora` writes an exact plain PEFT LoRA: A' = T A, B' = B, the same r and
alpha. Tools that serve only lora_A/lora_B with one global alpha/r (vLLM and
friends) then serve the chain adapter unchanged. `merge_to_full_model` writes
the base model with the adapter merged in.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CHAIN_PEFT_TYPE, ChainLoraConfig
from .cores import ChainCore
from .layer import link_factors
from .registration import trim_padded_links

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def fold_to_lora(
    model_or_adapter_dir: PeftModel | str | os.PathLike, out_dir: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Write a chain adapter as the plain PEFT LoRA adapter with the same outputs, for any LoRA server.

    The chain adapters ("Mixture-of-Subspaces in Low-Rank Adaptation", Wu et al., arXiv:2406.11909;
    "Linear Chain Transformation", Wang et al., arXiv:2411.00039; "Matrix-Transformation Based Low-Rank
    Adaptation", Liang et al., arXiv:2403.07440) are each a LoRA whose A is T A:

        s B T A = s B' A',    A' = T A,  B' = B          (computed in float64)

    The links Chain of LoRA ("Chain of LoRA", Xia et al., arXiv:2401.04151) tied are stacked in: A' = [A_tied; T A],
    B' = [B_tied, s B] / s_R, a plain LoRA of rank R = sum(r_i) and scale s_R. A fused projection's
    blockdiag(B_1..B_k) becomes its B'. The global r is the rank most modules have; the others are
    listed by exact module name in `rank_pattern`.

    Args:
        model_or_adapter_dir: a PeftModel holding the chain adapter, or a saved chain adapter directory
            (no base model needed).
        out_dir: a new directory; it is written whole or not at all.
        adapter_name: the adapter of a PeftModel to fold.

    Returns:
        `out_dir`.

    Raises:
        ValueError: the adapter is not a chain adapter, or its files are damaged or disagree.
        FileNotFoundError: the adapter directory lacks adapter_config.json or adapter_model.safetensors.
        FileExistsError: `out_dir` exists and is not empty.
    """
    if isinstance(model_or_adapter_dir, PeftModel):
        config = model_or_adapter_dir.peft_config[adapter_name]
        tensors = trim_padded_links(
            model_or_adapter_dir,
            get_peft_model_state_dict(model_or_adapter_dir, adapter_name=adapter_name),
            adapter_name,
        )
        _require_chain_adapter(config, f"adapter '{adapter_name}' of the model")
    else:
        config, tensors = read_adapter(Path(model_or_adapter_dir))
        _require_chain_adapter(config, str(model_or_adapter_dir))
    lora_config, lora_tensors = fold_tensors(config, tensors)

    def write(tmp_dir: Path) -> None:
        lora_config.save_pretrained(str(tmp_dir))
        save_file({k: v.contiguous() for k, v in lora_tensors.items()}, str(tmp_dir / ADAPTER_WEIGHTS))

    return _write_new_directory(Path(out_dir), write)


def fold_tensors(
    config: ChainLoraConfig, tensors: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Fold every module's update (its current link and the links COLA tied) into plain LoRA factors;
    returns the plain LoraConfig and the saved-format tensors.

    Each module's update is B' A' with A' = [A_tied; T A] and B' = [B_tied, s B] (computed in float64);
    plain LoRA of rank R = rows of A' scales by its own s_R, so B' / s_R is saved as B.
    """
    lora_config = config.to_lora_config()
    folded = {key: value for key, value in tensors.items() if not _is_chain_tensor(key)}
    ranks = {}
    # every module of a chain adapter has a core: walk the A's, so a module whose core is gone is caught
    for module_key in sorted(key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")):
        A = tensors[f"{module_key}.lora_A.weight"]
        B = tensors[f"{module_key}.lora_B.weight"]
        factors = {
            key[len(f"{module_key}.lora_core.") :]: value
            for key, value in tensors.items()
            if key.startswith(f"{module_key}.lora_core.")
        }
        core = _core_from_tensors(config, module_key, A.shape[0], factors)
        split_sizes = config.fused_split_sizes(module_key, B.shape[0])
        r, alpha = _rank_and_alpha(config, module_key)
        B_update, A_update = link_factors(core, A.double(), B.double(), _lora_scale(config, r, alpha), split_sizes)
        if f"{module_key}.lora_tied_A.weight" in tensors:
            A_update = torch.cat([tensors[f"{module_key}.lora_tied_A.weight"].double(), A_update])
            B_update = torch.cat([tensors[f"{module_key}.lora_tied_B.weight"].double(), B_update], dim=1)
        ranks[module_key] = A_update.shape[0]
        folded[f"{module_key}.lora_A.weight"] = A_update.to(A.dtype)
        folded[f"{module_key}.lora_B.weight"] = (B_update / _lora_scale(config, ranks[module_key], alpha)).to(B.dtype)
    # one global rank where the modules agree (vLLM serves one); the others by exact name
    lora_config.r = max(set(ranks.values()), key=list(ranks.values()).count, default=lora_config.r)
    lora_config.rank_pattern = {
        _exact_module_pattern(module_key): rank for module_key, rank in ranks.items() if rank != lora_config.r
    }
    return lora_config, folded


def _is_chain_tensor(key: str) -> bool:
    return ".lora_core." in key or ".lora_tied_" in key


def _rank_and_alpha(config: LoraConfig, module_key: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives a module (rank_pattern and alpha_pattern, as LoraModel resolves them)."""
    name = module_key.removeprefix("base_model.model.")
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    return r, alpha


def _lora_scale(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _core_from_tensors(
    config: ChainLoraConfig, module_key: str, core_r: int, factors: dict[str, torch.Tensor]
) -> ChainCore:
    # identity init draws no random numbers; the saved factors replace it
    core = ChainCore(config.chain_type, core_r, config.chain_dims, init="identity").double()
    try:
        core.load_state_dict({name: value.double() for name, value in factors.items()})
    except RuntimeError as error:
        raise ValueError(
            f"The core tensors of '{module_key}' do not fit chain_type={config.chain_type!r}, "
            f"chain_dims={config.chain_dims}: the adapter file and its adapter_config.json disagree.\n{error}"
        ) from error
    return core


def _exact_module_pattern(module_key: str) -> str:
    # saved keys carry PEFT's "base_model.model." prefix; rank_pattern matches the model's own module names
    return re.escape(module_key.removeprefix("base_model.model."))


def read_adapter(adapter_dir: Path) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """A saved adapter's config and tensors; a missing or damaged file is named in a one-line error."""
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_file, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export reads adapters saved by save_pretrained (safetensors).")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError) as error:  # invalid JSON, unknown fields or peft_type
        raise ValueError(f"{config_file} is not a readable PEFT adapter config: {error}") from error
    try:
        tensors = load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({error}): it is truncated or damaged."
        ) from error
    return config, tensors


def saved_chain_config(adapter_dir: str | os.PathLike) -> dict | None:
    """The adapter_config.json of a chain adapter saved in `adapter_dir`; None for any other folder or adapter."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return None  # not ours to judge: PEFT names the damage when it loads the folder
    return config if isinstance(config, dict) and config.get("peft_type") == CHAIN_PEFT_TYPE else None


def _require_chain_adapter(config: PeftConfig, source: str) -> None:
    if not isinstance(config, ChainLoraConfig):
        raise ValueError(
            f"{source} holds a {type(config).__name__}, not a chain adapter: a plain LoRA needs no folding."
        )


MODEL_CLASS_FOR_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _model_class(task_type: str | None, base_model) -> type:
    """The adapter's task's Auto class; without a task_type, the base's own architecture: a bare AutoModel would
    lose the LM head, and PEFT would only warn that the adapter's keys did not match."""
    if task_type in MODEL_CLASS_FOR_TASK:
        return getattr(transformers, MODEL_CLASS_FOR_TASK[task_type])
    architectures = transformers.AutoConfig.from_pretrained(str(base_model)).architectures or []
    return getattr(transformers, architectures[0]) if architectures else transformers.AutoModel


def merge_to_full_model(
    adapter_dir: str | os.PathLike, base_model: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Merge a saved adapter (a chain adapter, or plain LoRA) into its base model; save the full model.

    For the chain adapters of `fold_to_lora`'s papers and the links of Chain of LoRA (arXiv:2401.04151):

        W = W0 + s B T A + sum over tied links s_i B_i T_i A_i

    computed by PEFT's `merge_and_unload(safe_merge=True)` through the chain layers, on the base loaded
    unquantized in its own dtype. The base's tokenizer files are copied beside the weights.

    Args:
        adapter_dir: a saved chain adapter directory.
        base_model: the directory (or hub id, when online) of the model the adapter was trained on.
        out_dir: a new directory; it is written whole or not at all.

    Returns:
        `out_dir`.

    Raises:
        ValueError: the adapter's files are damaged, or the merge gives non-finite weights.
        FileNotFoundError: the adapter directory lacks adapter_config.json or adapter_model.safetensors.
        FileExistsError: `out_dir` exists and is not empty.
    """
    # checked before the base model loads: a bad adapter fails in a second, naming the file
    config, _ = read_adapter(Path(adapter_dir))
    model = _model_class(config.task_type, base_model).from_pretrained(str(base_model), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(safe_merge=True)

    def write(tmp_dir: Path) -> None:
        merged.save_pretrained(str(tmp_dir), safe_serialization=True)
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (Path(base_model) / tokenizer_file).is_file():
                shutil.copy2(Path(base_model) / tokenizer_file, tmp_dir / tokenizer_file)
        (tmp_dir / "chainlora_merge.json").write_text(
            json.dumps({"adapter": str(adapter_dir), "base_model": str(base_model)}, indent=2)
        )

    return _write_new_directory(Path(out_dir), write)


def _write_new_directory(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling and rename it into place: a failure leaves nothing half written."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new output directory or remove it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
