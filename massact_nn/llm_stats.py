"""Per-token-position extremes of language/encoder model layers, and the LLM run result type.

The per-channel statistics (``abs_mean``, ``mean_abs``, ``max_abs``) of a language model are the
DiT ones, accumulated by :class:`massact_nn.stats.StatsAccumulator` with each prompt as one
"step 0" sample over its real (non-padding) tokens. What LLM studies add (Sun et al. 2024,
"Massive Activations in Large Language Models") is *where* the largest activations sit: per layer,
the top |h| values of a sequence against the median |h| of that layer, with their token position,
token text and channel. :class:`PositionAccumulator` keeps exactly that, a handful of numbers per
(prompt, layer), so it streams like the channel statistics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, save_json
from .errors import MassactError, choice_error
from .sites import Site
from .stats import ChannelStats

LLM_FILE = "llm.json"


class PositionAccumulator:
    """Per (prompt, layer): the largest |h| entries and the median |h| of the layer.

    Args:
        sites: The layers measured.
        n_top: How many of the largest |h| per prompt and layer are summarised as ``top_abs``
            (Sun et al. plot top-1, 2, 3).
        keep: Largest entries over all prompts kept per layer in the result (exact: each
            prompt contributes its ``max(n_top, keep)`` largest).
    """

    def __init__(self, sites: Sequence[Site], n_top: int = 3, keep: int = 10) -> None:
        for name, v in (("n_top", n_top), ("keep", keep)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MassactError(f"{name}={v!r} is out of range; accepted: an integer >= 1")
        self.sites = list(sites)
        self.n_top, self.keep = n_top, keep
        self.tokens: dict[int, list[str]] = {}
        # module -> list of (prompt, signed top values [n], flat indices [n], median |h| [])
        self._rows: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            s.module: [] for s in self.sites
        }

    def set_tokens(self, prompt: int, tokens: Sequence[str]) -> None:
        """Record the token texts of prompt ``prompt`` (its real tokens, in order)."""
        self.tokens[prompt] = [str(t) for t in tokens]

    def add(self, module: str, prompt: int, h: torch.Tensor) -> None:
        """Add one layer's hidden states of one prompt (real tokens only).

        Shapes:
            h: [tokens, channels].
        """
        rows = self._rows.get(module)
        if rows is None:
            raise choice_error("site", module, self._rows)
        if h.ndim != 2 or h.shape[0] == 0:
            raise MassactError(
                f"site {module}: expected hidden states [tokens, channels], got {tuple(h.shape)}"
            )
        a = h.detach().abs().float().flatten()
        # Enough per prompt for the `keep` largest over all prompts to be among them. A stable
        # sort, not topk: in bf16 a massive value often repeats exactly across tokens, and topk
        # picks among ties in no defined order; ties here go to the earlier token (lower
        # flat index), so which token holds the top entry is reproducible.
        n = min(max(self.n_top, self.keep), a.numel())
        flat = torch.sort(a, descending=True, stable=True).indices[:n]
        # Signed values: Sun et al. report the sign too (massive activations are often negative).
        vals = h.detach().float().flatten()[flat]
        # Kept on the model's device until result(): a read-back here would stall a GPU per layer.
        rows.append((prompt, vals, flat, a.median()))

    def result(self) -> TokenPositions:
        """Per-layer summaries (see :class:`TokenPositions`)."""
        layers = []
        for s in self.sites:
            rows = self._rows[s.module]
            if not rows:
                raise MassactError(f"site {s.module}: no hidden states were accumulated")
            rows = [(p, v.cpu(), f.cpu(), m.cpu()) for p, v, f, m in rows]
            layers.append(self._layer(s, rows))
        return TokenPositions(
            layers=layers,
            tokens=[self.tokens.get(i, []) for i in range(max(self.tokens, default=-1) + 1)],
            n_top=self.n_top, keep=self.keep,
        )

    def _layer(self, s: Site, rows: list) -> dict:
        c = s.channels
        tops = torch.zeros(len(rows), self.n_top)  # |top-j| per prompt (0 where fewer entries)
        meds = torch.stack([r[3] for r in rows])
        entries = []
        top1_text: Counter = Counter()
        top1_index: Counter = Counter()
        top1_channel: Counter = Counter()
        for i, (p, vals, flat, med) in enumerate(rows):
            j = min(self.n_top, vals.numel())
            tops[i, :j] = vals[:j].abs()
            toks = self.tokens.get(p, [])
            for j, (v, f) in enumerate(zip(vals.tolist(), flat.tolist())):
                t, ch = divmod(int(f), c)
                e = {
                    "prompt": p, "token": t, "token_text": toks[t] if t < len(toks) else None,
                    "last": t == len(toks) - 1, "channel": ch, "value": v,
                    "ratio_median": _ratio(abs(v), float(med)),
                }
                entries.append(e)
                if j == 0:
                    top1_text[e["token_text"]] += 1
                    top1_index[str(t)] += 1
                    top1_channel[str(ch)] += 1
        # Stable: equal values keep prompt order, then token order within a prompt.
        entries.sort(key=lambda e: -abs(e["value"]))
        ratios = torch.tensor([_ratio(float(t), float(m)) for t, m in zip(tops[:, 0], meds)])
        return {
            **s.to_json(),
            "median_abs": float(meds.mean()),
            "top_abs": tops.mean(0).tolist(),
            "ratio_top1_median": float(ratios.mean()),
            "top": entries[: self.keep],
            "top1_token_text": dict(top1_text.most_common()),
            "top1_token_index": dict(top1_index.most_common()),
            "top1_channel": dict(top1_channel.most_common()),
        }


def _ratio(top: float, med: float) -> float:
    return float("inf") if med == 0 else top / med


@dataclass
class TokenPositions:
    """Where the largest activations of each layer sit.

    Attributes:
        layers: One dict per site in layer order: the site fields, ``median_abs`` (median |h| of
            the layer, mean over prompts), ``top_abs`` (the j-th largest |h|, mean over prompts),
            ``ratio_top1_median`` (largest |h| over the layer median, mean over prompts), ``top``
            (the ``keep`` largest entries over all prompts: prompt, token, token_text, last,
            channel, signed value, ratio_median), and counts of the top-1 entry's token text,
            token index and channel over prompts.
        tokens: Token texts of each prompt (real tokens only).
        n_top: Entries kept per prompt and layer.
        keep: Entries kept per layer.
    """

    layers: list[dict]
    tokens: list[list[str]] = field(default_factory=list)
    n_top: int = 3
    keep: int = 10

    def layer(self, module: str | int) -> dict:
        """One layer's dict, by module path or flat layer index."""
        for d in self.layers:
            if d["module"] == module or d["layer"] == module:
                return d
        raise choice_error("site", module, [d["module"] for d in self.layers])

    def to_json(self) -> dict:
        """Plain-JSON form (what ``llm.json`` holds)."""
        return {"n_top": self.n_top, "keep": self.keep, "tokens": self.tokens, "layers": self.layers}

    @classmethod
    def from_json(cls, d: dict) -> TokenPositions:
        """Inverse of :meth:`to_json`."""
        return cls(layers=list(d["layers"]), tokens=list(d.get("tokens", [])),
                   n_top=int(d.get("n_top", 3)), keep=int(d.get("keep", 10)))


@dataclass
class LLMStats:
    """Channel statistics plus token-position extremes of one language/encoder model run.

    Saved to a run folder as the DiT layout (``stats.safetensors`` / ``stats.json``, so
    :meth:`ChannelStats.load` and every viewer read it) plus ``llm.json`` (:class:`TokenPositions`).

    Attributes:
        channels: Per-channel ``abs_mean``, ``mean_abs``, ``max_abs`` per layer (steps = 1).
        positions: Where the largest activations sit, per layer.
    """

    channels: ChannelStats
    positions: TokenPositions

    def summary(self, k: int | None = None) -> list[dict]:
        """Per layer: channel summary (top-k, top-1/median of abs_mean) + the largest entry."""
        rows = []
        for row in self.channels.summary(k):
            pos = self.positions.layer(row["module"])
            rows.append({
                **row,
                "ratio_top1_median_tokens": pos["ratio_top1_median"],
                "largest": pos["top"][0] if pos["top"] else None,
            })
        return rows

    def save(self, folder: str | Path) -> Path:
        """Write ``stats.safetensors``, ``stats.json`` and ``llm.json`` into ``folder``."""
        folder = Path(folder)
        self.channels.save(folder)
        save_json(folder / LLM_FILE, self.positions.to_json())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LLMStats:
        """Read a run folder written by :meth:`save`."""
        folder = Path(folder)
        channels = ChannelStats.load(folder)
        if not (folder / LLM_FILE).is_file():
            raise MassactError(
                f"no {LLM_FILE} in {str(folder)!r}; expected a run folder written by `massact llm-stats`"
            )
        return cls(channels=channels, positions=TokenPositions.from_json(load_json(folder / LLM_FILE)))
