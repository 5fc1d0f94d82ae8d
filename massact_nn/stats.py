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


class _SiteAccumulator:
    """Running sums for one site (all tensors live on the model's device)."""

    def __init__(self, channels: int, steps: int, per_step: bool, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.sum_abs_m = z(channels)
        self.sum_m = z(channels)
        self.sum_mean_abs = z(channels)
        self.max_abs = z(channels)
        self.count = 0
        self.step_sum = z(steps, channels) if per_step else None
        self.step_count = [0] * steps
        self.nonfinite = torch.zeros(steps, dtype=torch.bool, device=device)
        # Per-batch buffers, reset by begin_batch.
        self.prompt_sum: torch.Tensor | None = None
        self.step_sets: list[torch.Tensor | None] = []
        # The step being accumulated: under true CFG with unconditional calls counted, one step
        # spans two consecutive calls, and its top-k set must come from both.
        self.cur_step: int | None = None
        self.cur_sum: torch.Tensor | None = None
        self.prompt_sets: list[torch.Tensor] = []  # [P_batch, k] per finished batch
        self.step_sets_done: list[torch.Tensor] = []  # [P_batch, S, k] per finished batch


class StatsAccumulator:
    """Mergeable streaming statistics over (prompt, step) samples for a set of sites.

    Args:
        sites: The sites to accumulate.
        steps: Denoising steps per trajectory.
        k: Size of the per-prompt and per-step top-k sets kept for stability (Jaccard) summaries.
        per_step: Also keep ``per_step_abs_mean`` [steps × channels] per site.
        device: Where the running sums live (the model's device).
    """

    def __init__(
        self,
        sites: Sequence[Site],
        steps: int,
        k: int = 4,
        per_step: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if steps < 1:
            raise MassactError(f"steps={steps!r} is out of range; accepted: an integer >= 1")
        self.sites = list(sites)
        for s in self.sites:
            check_k(k, s.channels)
        self.steps, self.k, self.per_step = steps, k, per_step
        self.device = torch.device(device)
        self._acc = {
            s.module: _SiteAccumulator(s.channels, steps, per_step, self.device) for s in self.sites
        }
        self._batch_prompts = 0

    def begin_batch(self, prompts: int) -> None:
        """Start a batch of ``prompts`` trajectories (rows map to them via ``prompt_of_row``)."""
        self._batch_prompts = prompts
        for a, s in zip(self._acc.values(), self.sites):
            a.prompt_sum = torch.zeros(prompts, s.channels, device=self.device)
            a.step_sets = [None] * self.steps

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
        if h.ndim != 3 or h.shape[-1] != a.sum_abs_m.shape[0]:
            raise MassactError(
                f"site {module}: expected image tokens [rows, tokens, {a.sum_abs_m.shape[0]}], "
                f"got {tuple(h.shape)}"
            )
        if prompt_of_row is None:
            prompt_of_row = torch.arange(h.shape[0], device=h.device)
        m = torch.mean(h, dim=1, dtype=torch.float32).to(self.device)  # [R, C]
        habs = h.abs()
        mean_abs = torch.mean(habs, dim=1, dtype=torch.float32).to(self.device)
        max_abs = habs.amax(dim=(0, 1)).float().to(self.device)
        absm = m.abs()
        a.sum_abs_m += absm.sum(0)
        a.sum_m += m.sum(0)
        a.sum_mean_abs += mean_abs.sum(0)
        torch.maximum(a.max_abs, max_abs, out=a.max_abs)
        a.count += h.shape[0]
        a.nonfinite[step] |= ~torch.isfinite(max_abs).all()
        if a.step_sum is not None:
            a.step_sum[step] += absm.sum(0)
        a.step_count[step] += h.shape[0]
        rows = prompt_of_row.to(self.device).long()
        per_prompt = torch.zeros_like(a.prompt_sum).index_add_(0, rows, absm)
        a.prompt_sum += per_prompt
        if a.cur_step == step:
            a.cur_sum += per_prompt
        else:
            self._close_step(a)
            a.cur_step, a.cur_sum = step, per_prompt

    def _close_step(self, a: _SiteAccumulator) -> None:
        if a.cur_step is not None:
            a.step_sets[a.cur_step] = torch.topk(a.cur_sum, self.k, dim=1).indices
        a.cur_step, a.cur_sum = None, None

    def end_batch(self) -> None:
        """Close a batch: keep each prompt's top-k set and per-step top-k sets."""
        for module, a in self._acc.items():
            self._close_step(a)
            missing = [i for i, s in enumerate(a.step_sets) if s is None]
            if missing:
                raise MassactError(
                    f"site {module}: no activations seen at steps {missing}; the pipeline made "
                    f"fewer transformer calls than the {self.steps} steps asked for"
                )
            a.prompt_sets.append(torch.topk(a.prompt_sum, self.k, dim=1).indices.cpu())
            a.step_sets_done.append(torch.stack(a.step_sets, 1).cpu())  # [P, S, k]
            a.prompt_sum, a.step_sets = None, []

    def check_finite(self) -> None:
        """Raise on the earliest (step, layer) whose activations were not finite.

        The earliest one is where the problem starts: non-finite values then reach every later
        block and, through the latents, every later step.
        """
        bad = []
        for layer, (module, a) in enumerate(self._acc.items()):
            steps = a.nonfinite.nonzero().flatten().tolist()
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
            t[f"abs_mean/{module}"] = (a.sum_abs_m / a.count).cpu()
            t[f"mean_abs/{module}"] = (a.sum_mean_abs / a.count).cpu()
            t[f"mean/{module}"] = (a.sum_m / a.count).cpu()
            t[f"max_abs/{module}"] = a.max_abs.cpu()
            if a.step_sum is not None:
                counts = torch.tensor(a.step_count, dtype=torch.float32).clamp_min(1)
                t[f"per_step_abs_mean/{module}"] = (a.step_sum.cpu() / counts[:, None])
            t[f"prompt_topk/{module}"] = torch.cat(a.prompt_sets)
            t[f"step_topk/{module}"] = torch.cat(a.step_sets_done)
            t[f"count/{module}"] = torch.tensor([a.count], dtype=torch.int64)
            t[f"step_count/{module}"] = torch.tensor(a.step_count, dtype=torch.int64)
        meta = dict(meta or {})
        meta.update(k=self.k, steps=self.steps, per_step=self.per_step)
        return ChannelStats(sites=list(self.sites), tensors=t, meta=meta)


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
