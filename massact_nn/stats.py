"""Streaming per-channel statistics of image-stream hidden states, and their result type.

The accumulator sees one site's image tokens at a time and keeps only [channels]-sized running
sums on the model's device, so a sweep over every block and step of FLUX.1-dev costs memory
O(sites × channels) instead of the ~80 GB the activations themselves would take. Everything is
accumulated in float32 whatever the model dtype (fp16 overflows on massive channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, load_tensors, save_json, save_tensors
from .errors import MassactError, check_k, choice_error
from .selection import mean_pairwise_jaccard_fast, ratio_top1_median, top_k
from .sites import Site, resolve_sites

STATISTICS = ("abs_mean", "mean_abs", "max_abs")
"""Magnitude statistics per channel. ``abs_mean``: mean over (prompt, step) of |token-mean| (the
paper's selection statistic); ``mean_abs``: mean of token-mean |h| (LLM massive-activation work);
``max_abs``: max |h|."""
SIGNED = ("mean",)
"""``mean``: the signed token-mean averaged over (prompt, step), what "set to the channel mean"
disruption writes. Not a magnitude, so viewers with log scales leave it out."""


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``.

    Runs of equal length over consecutive values (the usual step pattern) are built on the device,
    so no host-to-device copy waits on the GPU.
    """
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    first, size = runs[0]
    if all(r == [first + i, size] for i, r in enumerate(runs)):
        # Elementwise only: repeat_interleave would read a size back from the device.
        return torch.arange(len(runs) * size, device=device) // size + first
    return torch.tensor(values, dtype=torch.long, device=device)


class _SiteAccumulator:
    """Running sums for one site (all tensors live on the model's device)."""

    def __init__(self, channels: int, steps: int, per_step: bool, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.channels = channels
        self.sum_abs_m = z(channels)
        self.sum_m = z(channels)
        self.sum_mean_abs = z(channels)
        self.max_abs = z(channels)
        self.count = 0
        self.step_sum = z(steps, channels) if per_step else None
        self.step_count = [0] * steps
        self.nonfinite = torch.zeros(steps, dtype=torch.int32, device=device)
        # Per-batch: sum over a step's calls of each prompt's |token-mean|, for the per-prompt and
        # per-step top-k sets (under true CFG with unconditional calls counted, one step spans
        # two calls, and its set must come from both).
        self.step_prompt_sum: torch.Tensor | None = None  # [steps, P_batch, channels]
        self.seen_steps: set[int] = set()
        # Reductions of updates not folded into the sums yet: (step, prompt_of_row, mean,
        # sum |h|, max |h|, tokens).
        self.pending: list[tuple] = []
        self.prompt_sets: list[torch.Tensor] = []  # [P_batch, k] per finished batch
        self.step_sets_done: list[torch.Tensor] = []  # [P_batch, S, k] per finished batch


class StatsAccumulator:
    """Mergeable streaming statistics over (prompt, step) samples for a set of sites.

    ``update`` runs inside the trace at every site and step, so it does the least work that
    keeps nothing token-sized: three reductions over the tokens (sum, sum |h| and max |h|).
    Folding them into the running sums, the per-step and per-prompt sets and the finiteness
    check is batched over many updates (``flush_every``, and at the end of a batch): per-call
    kernel launches and Python work, not arithmetic, are what a wide model's GPU would otherwise
    wait on.

    Args:
        sites: Sites to accumulate.
        steps: Denoising steps per trajectory.
        k: Size of the per-prompt and per-step top-k sets kept for stability (Jaccard) summaries.
        per_step: Also keep ``per_step_abs_mean`` [steps × channels] per site.
        device: Where the running sums live (the model's device).
        flush_every: Updates per site held as [rows, channels] reductions before they are folded
            in (bounds that memory: ``3 × flush_every × rows × channels`` floats per site).
    """

    def __init__(
        self,
        sites: Sequence[Site],
        steps: int,
        k: int = 4,
        per_step: bool = False,
        device: torch.device | str = "cpu",
        flush_every: int = 32,
    ) -> None:
        if steps < 1:
            raise MassactError(f"steps={steps!r} is out of range; accepted: an integer >= 1")
        if flush_every < 1:
            raise MassactError(f"flush_every={flush_every!r} is out of range; accepted: an integer >= 1")
        self.sites = list(sites)
        for s in self.sites:
            check_k(k, s.channels)
        self.steps, self.k, self.per_step = steps, k, per_step
        self.device = torch.device(device)
        self.flush_every = flush_every
        self._acc = {
            s.module: _SiteAccumulator(s.channels, steps, per_step, self.device) for s in self.sites
        }
        self._batch_prompts = 0
        self._aranges: dict[int, torch.Tensor] = {}

    def begin_batch(self, prompts: int) -> None:
        """Start a batch of ``prompts`` trajectories (rows map to them via ``prompt_of_row``)."""
        self._batch_prompts = prompts
        for a, s in zip(self._acc.values(), self.sites):
            a.step_prompt_sum = torch.zeros(self.steps, prompts, s.channels, device=self.device)
            a.seen_steps = set()
            a.pending = []

    def update(
        self, module: str, step: int, h: torch.Tensor, prompt_of_row: torch.Tensor | None = None
    ) -> None:
        """Add one site's image tokens at one denoising step.

        Args:
            module: Site module path.
            step: Denoising step index (0-based).
            h: Image-stream tokens, one row per sample.
            prompt_of_row: Which prompt of the batch each row belongs to (default: row i is
                prompt i). Rows of one prompt (e.g. its unconditional branch) count as samples.

        Shapes:
            h: [rows, tokens, channels]; prompt_of_row: [rows].
        """
        a = self._acc.get(module)
        if a is None:
            raise choice_error("site", module, self._acc)
        if not 0 <= step < self.steps:
            raise MassactError(f"step={step} is out of range; accepted: 0..{self.steps - 1}")
        if h.ndim != 3 or h.shape[-1] != a.channels:
            raise MassactError(
                f"site {module}: expected image tokens [rows, tokens, {a.channels}], got {tuple(h.shape)}"
            )
        if a.step_prompt_sum is None:
            raise MassactError("update() before begin_batch(); accepted: begin_batch, updates, end_batch")
        rows = h.shape[0]
        if prompt_of_row is None:
            prompt_of_row = self._arange(rows)
        # Four kernels, no float32 copy of h (a GPU reduces bf16/fp16 into float32 directly); a
        # maximum is exact in h's own dtype. abs() then sum/amax rather than vector_norm(ord=1 /
        # inf): on CPU the norm kernels over the token dim were 6-11x slower (1.0 ms vs 0.12 ms
        # for [1, 1024, 256]), which alone cost 2.5% of a generation.
        s = torch.sum(h, dim=1, dtype=torch.float32)  # [R, C]
        habs = h.abs()
        l1 = torch.sum(habs, dim=1, dtype=torch.float32)
        linf = torch.amax(habs, dim=1)
        a.pending.append((step, prompt_of_row, s, l1, linf, h.shape[1]))
        a.seen_steps.add(step)
        a.step_count[step] += rows
        a.count += rows
        if len(a.pending) >= self.flush_every:
            self._flush(a)

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    def _flush(self, a: _SiteAccumulator) -> None:
        """Fold the pending reductions into the sums: a fixed handful of kernels per flush."""
        if not a.pending:
            return
        steps, prow, sums, l1s, lis, tokens = zip(*a.pending)
        a.pending = []
        dev = self.device
        sums = torch.stack(sums).to(dev)  # [U, R, C]
        l1 = torch.stack(l1s).to(dev)
        linf = torch.stack(lis).to(dev).float()
        prow = torch.stack(prow).to(dev).long()  # [U, R]
        if len(set(tokens)) == 1:
            per_token = 1.0 / tokens[0]
        else:
            per_token = 1.0 / torch.tensor(tokens, dtype=torch.float32, device=dev)[:, None, None]
        m = sums * per_token  # token means
        mean_abs = l1 * per_token
        absm = m.abs()
        a.sum_abs_m += absm.sum((0, 1))
        a.sum_m += m.sum((0, 1))
        a.sum_mean_abs += mean_abs.sum((0, 1))
        torch.maximum(a.max_abs, linf.amax((0, 1)), out=a.max_abs)
        st = _index(list(steps), dev)  # [U]
        a.nonfinite.index_add_(0, st, (~torch.isfinite(linf).flatten(1).all(1)).int())
        if a.step_sum is not None:
            a.step_sum.index_add_(0, st, absm.sum(1))
        flat = (st[:, None] * self._batch_prompts + prow).flatten()
        a.step_prompt_sum.view(-1, a.channels).index_add_(0, flat, absm.flatten(0, 1))

    def end_batch(self) -> None:
        """Close a batch: keep each prompt's top-k set and per-step top-k sets."""
        for module, a in self._acc.items():
            self._flush(a)
            missing = [s for s in range(self.steps) if s not in a.seen_steps]
            if missing:
                raise MassactError(
                    f"site {module}: no activations seen at steps {missing}; the pipeline made "
                    f"fewer transformer calls than the {self.steps} steps asked for"
                )
            per = a.step_prompt_sum  # [S, P, C]
            # Kept on the device until result(): one transfer for everything, not one per site.
            a.prompt_sets.append(torch.topk(per.sum(0), self.k, dim=1).indices)
            a.step_sets_done.append(torch.topk(per, self.k, dim=2).indices.transpose(0, 1))  # [P, S, k]
            a.step_prompt_sum = None

    def check_finite(self) -> None:
        """Raise on the earliest (step, layer) whose activations were not finite.

        The earliest one is where the problem starts: non-finite values then reach every later
        block and, through the latents, every later step.
        """
        flags = torch.stack([a.nonfinite for a in self._acc.values()]).cpu()  # [sites, steps], one read
        bad = []
        for layer, module in enumerate(self._acc):
            steps = flags[layer].nonzero().flatten().tolist()
            if steps:
                bad.append((steps[0], layer, module, steps))
        if bad:
            step, _, module, steps = min(bad)
            raise MassactError(
                f"non-finite activations at site {module}, step {step} "
                f"(steps affected there: {steps}); try --dtype float32"
            )

    def result(self, meta: dict | None = None) -> ChannelStats:
        """Finish: means, maxima and stability summaries as a :class:`ChannelStats`."""
        self.check_finite()
        t: dict[str, torch.Tensor] = {}
        for module, a in self._acc.items():
            if a.count == 0:
                raise MassactError(f"site {module}: no samples were accumulated")
            t[f"abs_mean/{module}"] = a.sum_abs_m / a.count
            t[f"mean_abs/{module}"] = a.sum_mean_abs / a.count
            t[f"mean/{module}"] = a.sum_m / a.count
            t[f"max_abs/{module}"] = a.max_abs
            if a.step_sum is not None:
                counts = torch.tensor(a.step_count, dtype=torch.float32).clamp_min(1)
                t[f"per_step_abs_mean/{module}"] = a.step_sum / counts.to(a.step_sum.device)[:, None]
            t[f"prompt_topk/{module}"] = torch.cat(a.prompt_sets)
            t[f"step_topk/{module}"] = torch.cat(a.step_sets_done)
        t = _to_host(t)
        for module, a in self._acc.items():
            t[f"count/{module}"] = torch.tensor([a.count], dtype=torch.int64)
            t[f"step_count/{module}"] = torch.tensor(a.step_count, dtype=torch.int64)
        meta = dict(meta or {})
        meta.update(k=self.k, steps=self.steps, per_step=self.per_step)
        return ChannelStats(sites=list(self.sites), tensors=t, meta=meta)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, moved in one transfer per dtype (each transfer waits on the GPU)."""
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, x in tensors.items():
        by_dtype.setdefault(x.dtype, []).append(key)
    for keys in by_dtype.values():
        flat = torch.cat([tensors[k].reshape(-1) for k in keys]).cpu()
        for k, part in zip(keys, flat.split([tensors[k].numel() for k in keys])):
            out[k] = part.reshape(tensors[k].shape).clone()
    return {k: out[k] for k in tensors}


@dataclass
class ChannelStats:
    """Per-site channel statistics of one model over a set of prompts and steps.

    Saved to a run folder as ``stats.safetensors`` (keys ``abs_mean/<module>``,
    ``mean_abs/<module>``, ``max_abs/<module>``, ``mean/<module>`` (signed), optional
    ``per_step_abs_mean/<module>``, and the
    bookkeeping that makes shards mergeable: ``count/``, ``step_count/``, ``prompt_topk/``,
    ``step_topk/``) plus ``stats.json`` (metadata and the per-site summary).

    Attributes:
        sites: Sites in layer order.
        tensors: Flat tensor dict, keyed ``<statistic>/<module>``.
        meta: Model, architecture, library versions, prompts, seed, steps, size, guidance, k.
    """

    sites: list[Site]
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    # -- access ---------------------------------------------------------------
    def site(self, key: str | int) -> Site:
        """A site by module path or layer index (clear error if unknown)."""
        return resolve_sites(self.sites, [key])[0]

    def stat(self, module: str | int, name: str = "abs_mean") -> torch.Tensor:
        """One statistic at one site.

        Shapes:
            -> [channels] (``per_step_abs_mean``: [steps, channels]).
        """
        accepted = STATISTICS + SIGNED + (("per_step_abs_mean",) if self.has_per_step else ())
        if name not in accepted:
            raise choice_error("statistic", name, accepted)
        key = f"{name}/{self.site(module).module}"
        if key not in self.tensors:
            raise MassactError(f"statistic {name!r} is not in this run (written by an older version?); "
                               f"present: {sorted({k.split('/')[0] for k in self.tensors})}")
        return self.tensors[key]

    @property
    def has_per_step(self) -> bool:
        """Whether per-step curves were collected."""
        return any(k.startswith("per_step_abs_mean/") for k in self.tensors)

    def require_per_step(self) -> None:
        """Raise a clear error unless per-step curves were collected."""
        if not self.has_per_step:
            raise MassactError(
                "these statistics have no per-step curves; accepted: a run collected with "
                "per_step=True (`massact stats --per-step`)"
            )

    @property
    def k(self) -> int:
        """The k of the stored top-k sets."""
        return int(self.meta.get("k", 4))

    def top(self, module: str | int, k: int | None = None, stat: str = "abs_mean") -> torch.Tensor:
        """Top-k channel ids at a site by a statistic, largest first.

        Shapes:
            -> [k].
        """
        return top_k(self.stat(module, stat), self.k if k is None else k)

    def matrix(self, stat: str = "abs_mean") -> torch.Tensor:
        """A statistic stacked over sites (all sites must have the same width).

        Shapes:
            -> [sites, channels].
        """
        widths = {s.channels for s in self.sites}
        if len(widths) != 1:
            raise MassactError(f"sites have different widths {sorted(widths)}; use stat() per site")
        return torch.stack([self.stat(s.module, stat) for s in self.sites])

    def summary(self, k: int | None = None) -> list[dict]:
        """Per-site summary in layer order: top-k ids, top-1/median ratio, set stability."""
        kk = self.k if k is None else k
        rows = []
        for s in self.sites:
            am = self.stat(s.module)
            psets = self.tensors[f"prompt_topk/{s.module}"][:, :kk]
            ssets = self.tensors[f"step_topk/{s.module}"][..., :kk]
            jp = mean_pairwise_jaccard_fast(psets, s.channels)
            per_prompt = [mean_pairwise_jaccard_fast(x, s.channels) for x in ssets]
            js = float(torch.tensor(per_prompt).nanmean()) if per_prompt else float("nan")
            rows.append({
                **s.to_json(),
                "top": top_k(am, kk).tolist(),
                "ratio_top1_median": ratio_top1_median(am),
                "ratio_top1_median_mean_abs": ratio_top1_median(self.stat(s.module, "mean_abs")),
                "jaccard_prompts": None if jp != jp else jp,
                "jaccard_steps": None if js != js else js,
            })
        return rows

    # -- merge ----------------------------------------------------------------
    def merge(self, other: ChannelStats) -> ChannelStats:
        """Combine statistics of two disjoint prompt shards into those of their union.

        Means are recombined by sample counts in float64, maxima by max, top-k sets concatenate.
        """
        if [s.module for s in self.sites] != [s.module for s in other.sites]:
            raise MassactError("cannot merge statistics over different site lists")
        for key in ("model", "steps", "k", "height", "width"):
            if self.meta.get(key) != other.meta.get(key):
                raise MassactError(
                    f"cannot merge: {key} differs ({self.meta.get(key)!r} vs {other.meta.get(key)!r})"
                )
        a, b, t = self.tensors, other.tensors, {}
        for s in self.sites:
            m = s.module
            na, nb = a[f"count/{m}"].double(), b[f"count/{m}"].double()
            for name in ("abs_mean", "mean_abs", "mean"):
                t[f"{name}/{m}"] = ((a[f"{name}/{m}"].double() * na + b[f"{name}/{m}"].double() * nb)
                                    / (na + nb)).float()
            t[f"max_abs/{m}"] = torch.maximum(a[f"max_abs/{m}"], b[f"max_abs/{m}"])
            sa, sb = a[f"step_count/{m}"].double(), b[f"step_count/{m}"].double()
            if f"per_step_abs_mean/{m}" in a and f"per_step_abs_mean/{m}" in b:
                num = a[f"per_step_abs_mean/{m}"].double() * sa[:, None]
                num += b[f"per_step_abs_mean/{m}"].double() * sb[:, None]
                t[f"per_step_abs_mean/{m}"] = (num / (sa + sb).clamp_min(1)[:, None]).float()
            for name in ("prompt_topk", "step_topk"):
                t[f"{name}/{m}"] = torch.cat([a[f"{name}/{m}"], b[f"{name}/{m}"]])
            t[f"count/{m}"] = a[f"count/{m}"] + b[f"count/{m}"]
            t[f"step_count/{m}"] = a[f"step_count/{m}"] + b[f"step_count/{m}"]
        meta = dict(self.meta)
        meta["prompts"] = list(self.meta.get("prompts", [])) + list(other.meta.get("prompts", []))
        meta["per_step"] = self.has_per_step and other.has_per_step
        return ChannelStats(sites=list(self.sites), tensors=t, meta=meta)

    # -- persistence ----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``stats.safetensors`` and ``stats.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        save_tensors(folder / "stats.safetensors", self.tensors)
        meta = dict(self.meta)
        meta["sites"] = self.summary()
        save_json(folder / "stats.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ChannelStats:
        """Read a run folder written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / "stats.json").is_file() or not (folder / "stats.safetensors").is_file():
            raise MassactError(
                f"no statistics in {str(folder)!r}; expected stats.json and stats.safetensors "
                f"(written by `massact stats --out DIR`)"
            )
        meta = load_json(folder / "stats.json")
        sites = [Site.from_json(d) for d in meta.pop("sites")]
        return cls(sites=sites, tensors=load_tensors(folder / "stats.safetensors"), meta=meta)
