"""Channel statistics and token-position extremes of a language/encoder model, via nnsight.

The same statistics as the DiT side (:class:`massact_nn.stats.StatsAccumulator`): each prompt is
one "step 0" sample over its real tokens, so ``abs_mean`` = mean over prompts of |mean over
tokens of h|. Prompts run one per forward pass: no padding exists, so no padded token can leak
into a mean (the attention mask is applied anyway, in case a tokenizer pads a single text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from massact_nn.errors import MassactError, check_positive_int
from massact_nn.llm_stats import LLMStats, PositionAccumulator
from massact_nn.sites import resolve_sites
from massact_nn.stats import StatsAccumulator

from ..generation import as_prompts
from ..model import library_versions
from .adapters import llm_sites, read_hidden
from .model import LoadedLLM


@dataclass
class LLMStatsConfig:
    """What to measure.

    Attributes:
        k: Size of the top-k channel sets reported per layer (and kept per prompt for Jaccard).
        n_top: Largest |h| entries kept per prompt and layer (Sun et al.: top-1, 2, 3).
        keep: Largest entries over all prompts written per layer to ``llm.json``.
        sites: Module paths or layer indices to measure (``None``: every layer).
        max_length: Prompts are truncated to this many tokens.
        progress: Show a tqdm bar over prompts.
    """

    k: int = 4
    n_top: int = 3
    keep: int = 10
    sites: Sequence[str | int] | None = None
    max_length: int = 512
    progress: bool = True


def _device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def collect_llm_stats(
    llm: LoadedLLM, prompts: str | Sequence[str], config: LLMStatsConfig | None = None
) -> LLMStats:
    """Measure per-channel statistics and the largest activations' positions at every layer.

    Args:
        llm: A model from :func:`load_llm` or :func:`wrap`.
        prompts: Texts (a string is one text); each is tokenized alone (special tokens
            included, as the model expects).
        config: What to measure.

    Returns:
        :class:`LLMStats` (channel statistics with steps = 1, plus token positions).
    """
    config = config or LLMStatsConfig()
    prompts = as_prompts(prompts)
    requested = check_positive_int("max_length", config.max_length)
    module = llm.model._module
    max_length = min(requested, _positions(module, llm.tokenizer))
    specials = _special_tokens(llm.tokenizer)
    if max_length <= specials:
        # The tokenizer would skip truncation (with a warning) and run the whole text.
        raise MassactError(f"max_length={max_length} leaves no room for text: the tokenizer adds "
                           f"{specials} special tokens; accepted: an integer > {specials}")
    sites = resolve_sites(llm_sites(module), config.sites)
    device = _device(module)
    acc = StatsAccumulator(sites, steps=1, k=config.k, device=device)
    pos = PositionAccumulator(sites, n_top=config.n_top, keep=config.keep)
    envoys = {s.module: llm.model.get(s.module) for s in sites}
    n_tokens = []
    for i, prompt in enumerate(tqdm(prompts, desc="llm-stats", unit="prompt", disable=not config.progress)):
        enc = llm.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_length)
        ids = enc["input_ids"][0]
        if ids.numel() > max_length:
            raise MassactError(f"prompt {i} tokenized to {ids.numel()} tokens, over max_length="
                               f"{max_length}: the tokenizer did not truncate it")
        mask = enc.get("attention_mask")
        real = mask[0].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        if not real.any():
            raise MassactError(f"prompt {i} ({prompt!r}) has no tokens after tokenization")
        pos.set_tokens(i, llm.tokenizer.convert_ids_to_tokens(ids[real].tolist()))
        n_tokens.append(int(real.sum()))
        inputs = {k: v.to(device) for k, v in enc.items()}
        # Token ids of the real tokens, found on the CPU: a boolean-mask index on the device
        # would read its count back at every layer.
        keep = slice(None) if bool(real.all()) else real.nonzero().flatten().to(device)
        acc.begin_batch(1)
        with torch.no_grad(), llm.model.trace(**inputs):
            for s in sites:
                h = read_hidden(envoys[s.module].output, s.module, s.channels)[:, keep]  # [1, T, C]
                acc.update(s.module, 0, h)
                pos.add(s.module, i, h[0])
        acc.end_batch()
    meta = {
        "kind": "llm",
        "model": llm.name,
        "architecture": llm.family.name,
        "model_class": type(module).__name__,
        "layers": llm.layers,
        "source": llm.source,
        "n_layers": len(llm_sites(module)),
        "versions": library_versions(),
        "prompts": prompts,
        "tokens": n_tokens,
        "max_length": max_length,  # what truncation used: the request, or the model's limit
        "max_length_requested": requested,
        "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        "device": str(device),
    }
    return LLMStats(channels=acc.result(meta), positions=pos.result())


def _special_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds to one text (0 when it cannot say)."""
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=False))
    except (AttributeError, TypeError, NotImplementedError):
        return 0


def _positions(module: Any, tokenizer: Any) -> int:
    """The longest input the model takes: its position table, or the tokenizer's own limit.

    Longer prompts are truncated to it; past it, position embeddings would be indexed out of
    range (an IndexError deep in the model).
    """
    cfg = getattr(module, "config", None)
    limits = [getattr(cfg, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")]
    # RoBERTa-style embeddings number positions from padding_idx + 1: that many fewer fit.
    base = getattr(module, "base_model", module)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None:
        limits.append(table.num_embeddings - table.padding_idx - 1)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:  # transformers' "no limit" is ~1e30
        limits.append(model_max)
    limits = [int(n) for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else 1 << 62
