"""Streaming per-channel statistics of image-stream hidden states, and their result type.

The accumulator sees one site's image tokens at a time and keeps only [channels]-sized running
sums on the model's device, so a sweep over every block and step of FLUX.1-dev costs memory
O(sites × channels) instead of the ~80 GB the activations themselves would take. Everything is
accumulated in float32 whatever the model dtype (fp16 overflows on massive channels).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, load_tensors, save_json, save_tensors
from .errors import MassactError, check_k, choice_error
from .reduce import channel_sums, reduce_sums
from .selection import mean_pairwise_jaccard_fast, ratio_top1_median, top_k
from .sites import Site, resolve_sites
from .transfer import move_packed

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


class _Site:
    """One site's host-side bookkeeping; its sums are a row of its group's stacked tensors."""

    def __init__(self, module: str, group: _Group, pos: int) -> None:
        # A weak reference: the group lists its sites, and a cycle would keep every finished
        # run's device tensors alive until a garbage collection (which then takes milliseconds
        # at an unpredictable moment, possibly while a GPU waits).
        self.module, self._group, self.pos = module, weakref.ref(group), pos
        self.count = 0
        self.step_count = [0] * group.steps
        self.in_batch = False
        self.last_step = -1
        # The last step seen stays open: under true CFG with unconditional calls counted, a step
        # spans two calls (possibly across a fold) and its top-k set must come from both.
        self.open_step: int | None = None
        self.closed: set[int] = set()  # steps of this batch whose top-k sets are written
        # Reductions of updates not folded in yet: (step, prompt_of_row, sum, sum |h|, max |h|,
        # tokens), each [rows, channels] / [rows]; their steps, sizes and dtypes; and whether
        # they need the general fold (explicit prompt ids or differing row counts).
        self.pending: list[tuple] = []
        self.shape: tuple = ()
        self.irregular = False

    @property
    def group(self) -> _Group:
        return self._group()

    def hold(self, step: int, prompt_of_row: torch.Tensor | None, sums: tuple, tokens: int) -> None:
        """Keep one update's reductions until the next fold."""
        self.pending.append((step, prompt_of_row, *sums, tokens))
        s, linf = sums[0], sums[2]
        self.shape += ((step, s.shape[0], tokens, linf.dtype, s.device),)
        self.irregular |= prompt_of_row is not None or s.shape[0] != self.pending[0][2].shape[0]

    def clear(self) -> None:
        self.pending, self.shape, self.irregular = [], (), False

    def fold_key(self) -> tuple | None:
        """What must match for neighbouring sites to be folded together; None: fold it alone."""
        return None if self.irregular else (self.open_step, self.shape)


class _Group:
    """Running sums of the sites that share a width, stacked so one fold serves all of them.

    A site-by-site fold costs ~30 kernels per site: on a GPU, 57 sites made ~1,800 launches at
    the end of every batch, which the host issued after the generation had finished.

    Shapes:
        sum_abs_m, sum_m, sum_mean_abs, max_abs: [sites, channels]; step_sum: [sites, steps,
        channels]; nonfinite: [sites, steps]. Per batch: prompt_sum, open_sum: [sites, prompts,
        channels]; step_sets: [sites, prompts, steps, k]; bad_prompt: [sites]. Kept per finished
        batch: bad_sets: [sites] each.
    """

    def __init__(self, n: int, channels: int, steps: int, per_step: bool, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.channels, self.steps = channels, steps
        self.sites: list[_Site] = []
        self.sum_abs_m, self.sum_m, self.sum_mean_abs, self.max_abs = (z(n, channels) for _ in range(4))
        self.step_sum = z(n, steps, channels) if per_step else None
        self.nonfinite = torch.zeros(n, steps, dtype=torch.int32, device=device)
        self.prompt_sum = self.open_sum = self.step_sets = self.bad_prompt = None
        # Device prompt ids out of range, per batch: read with the results, in their transfer.
        self.bad_sets: list[torch.Tensor] = []
        self.batch_top: torch.Tensor | None = None  # [sites, P, k]: this batch's per-prompt sets
        self.prompt_sets: list[torch.Tensor] = []  # [sites, P_batch, k] per finished batch
        self.step_sets_done: list[torch.Tensor] = []  # [sites, P_batch, steps, k] per finished batch
        self.ready = 0  # sites holding flush_every or more pending updates


class StatsAccumulator:
    """Mergeable streaming statistics over (prompt, step) samples for a set of sites.

    ``update`` runs inside the trace at every site and step, so it does the least work that
    keeps nothing token-sized: three reductions over the tokens (sum, sum |h| and max |h|).
    Folding them into the running sums, the per-step and per-prompt sets and the finiteness
    check is deferred and batched: once every site of a width holds ``flush_every`` updates,
    one fold handles all of them (sites of one width keep their sums stacked), and ``fold()``
    or ``end_batch`` folds the rest. Per-call kernel launches and Python work, not arithmetic,
    are what a wide model's GPU would otherwise wait on. With the default row layout the
    per-(step, prompt) sums are reshapes and plain sums, deterministic on a GPU too; explicit
    ``prompt_of_row`` ids use ``index_add_``, whose float atomics may differ in the last bits
    between GPU runs.

    Within a batch each site's updates come in ascending step order (several per step allowed).

    Args:
        sites: Sites to accumulate.
        steps: Denoising steps per trajectory.
        k: Size of the per-prompt and per-step top-k sets kept for stability (Jaccard) summaries.
        per_step: Also keep ``per_step_abs_mean`` [steps × channels] per site.
        device: Where the running sums live (the model's device).
        flush_every: Updates per site held before they are folded in; the held reductions take
            ``flush_every × rows × channels × (8 + itemsize)`` bytes per site (FLUX.1-dev, one
            row, bf16: 57 sites × 8 × 3072 × 10 B = 14 MB). A site whose group lags (only some
            sites updated) is folded alone at ``4 × flush_every``.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        steps: int,
        k: int = 4,
        per_step: bool = False,
        device: torch.device | str = "cpu",
        flush_every: int = 8,
        compiled: Collection[tuple[int, ...]] = (),
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
        self.compiled = frozenset(tuple(int(d) for d in shape) for shape in compiled)
        self.ran_compiled: set[tuple[int, ...]] = set()  # shapes the compiled kernel did reduce
        widths = {s.channels: sum(x.channels == s.channels for x in self.sites) for s in self.sites}
        self._groups = {c: _Group(n, c, steps, per_step, self.device) for c, n in widths.items()}
        self._site: dict[str, _Site] = {}
        for s in self.sites:
            g = self._groups[s.channels]
            self._site[s.module] = a = _Site(s.module, g, len(g.sites))
            g.sites.append(a)
        self._batch_prompts = 0
        self._folded = False
        self._failed: str | None = None  # why a batch failed: its rows are half counted
        self._batch_sizes: list[int] = []  # prompts of each finished batch
        self._aranges: dict[int, torch.Tensor] = {}

    def begin_batch(self, prompts: int) -> None:
        """Start a batch of ``prompts`` trajectories (rows map to them via ``prompt_of_row``)."""
        if prompts < 1:
            raise MassactError(f"prompts={prompts!r} is out of range; accepted: an integer >= 1")
        self._require_usable()
        self._require_closed()
        self._batch_prompts, self._folded = prompts, False
        dev = self.device
        for g in self._groups.values():
            n, c = len(g.sites), g.channels
            g.prompt_sum = torch.zeros(n, prompts, c, device=dev)
            g.open_sum = torch.zeros(n, prompts, c, device=dev)
            g.step_sets = torch.zeros(n, prompts, self.steps, self.k, dtype=torch.long, device=dev)
            g.bad_prompt = torch.zeros(n, dtype=torch.bool, device=dev)
            g.ready = 0
        for a in self._site.values():
            a.in_batch, a.last_step, a.open_step, a.closed = True, -1, None, set()
            a.clear()

    def update(
        self, module: str, step: int, h: torch.Tensor, prompt_of_row: torch.Tensor | None = None
    ) -> None:
        """Add one site's image tokens at one denoising step.

        Args:
            module: Site module path.
            step: Denoising step index (0-based); per site, ascending within a batch.
            h: Image-stream tokens, one row per sample.
            prompt_of_row: Which prompt of the batch each row belongs to. Default: row r is
                prompt r, or prompt r % prompts when the rows are a multiple of the prompts
                (``[uncond; cond]``). Rows of one prompt (e.g. its unconditional branch) count
                as samples.
                Ids on the CPU are range-checked at once; ids on the device by ``result``, in its
                one transfer (reading them back earlier would stall the GPU).

        Shapes:
            h: [rows, tokens, channels]; prompt_of_row: [rows].
        """
        a = self._site.get(module)
        if a is None:
            raise choice_error("site", module, self._site)
        if not a.in_batch or self._folded:
            raise MassactError(f"update() {'after fold()' if a.in_batch else 'outside a batch'}; "
                               "accepted: begin_batch, updates, [fold], end_batch")
        if not 0 <= step < self.steps:
            raise MassactError(f"step={step} is out of range; accepted: 0..{self.steps - 1}")
        if step < a.last_step:
            raise MassactError(f"site {module}: step {step} after step {a.last_step}; accepted: "
                               "ascending steps within a batch")
        g = a.group
        if h.ndim != 3 or h.shape[-1] != g.channels or h.shape[0] < 1 or h.shape[1] < 1:
            raise MassactError(
                f"site {module}: expected image tokens [rows >= 1, tokens >= 1, {g.channels}], "
                f"got {tuple(h.shape)}"
            )
        rows = h.shape[0]
        P = self._batch_prompts
        if prompt_of_row is None:
            if rows > P and rows % P:
                raise MassactError(f"site {module}: {rows} rows for {P} prompts; accepted: at most "
                                   "one row per prompt, a multiple of the prompts, or prompt_of_row")
        elif tuple(prompt_of_row.shape) != (rows,):
            raise MassactError(f"site {module}: prompt_of_row has shape {tuple(prompt_of_row.shape)}; "
                               f"accepted: ({rows},), one prompt id per row")
        elif prompt_of_row.device.type == "cpu":
            lo, hi = int(prompt_of_row.min()), int(prompt_of_row.max())
            if lo < 0 or hi >= self._batch_prompts:
                raise MassactError(f"site {module}: prompt ids {prompt_of_row.tolist()} out of range; "
                                   f"accepted: 0..{self._batch_prompts - 1}")
        shape = tuple(h.shape) if self.compiled else None
        if shape in self.compiled:
            (s, l1, linf), used = reduce_sums(h, True)
            if used:
                self.ran_compiled.add(shape)
        else:
            s, l1, linf = channel_sums(h)
        # The ids are held until the fold: a copy, so the caller may reuse its buffer.
        ids = None if prompt_of_row is None else prompt_of_row.clone()
        a.hold(step, ids, (s, l1, linf), h.shape[1])
        a.last_step = step
        a.step_count[step] += rows
        a.count += rows
        held = len(a.pending)
        if held == self.flush_every:
            g.ready += 1
            if g.ready == len(g.sites):
                self._fold_group(g)
        elif held >= 4 * self.flush_every:
            self._fold_run(g, [a])
            g.ready -= 1

    def fold(self) -> None:
        """Fold every held reduction in and close each site's last step; nothing is read back.

        ``end_batch`` calls it. Calling it right after the batch's last update, inside the
        trace, queues its kernels while a GPU still runs the last blocks, instead of after the
        generation. No update is taken after it until the next batch.
        """
        self._require_usable()
        if self._folded:
            return
        self._require_open()
        for g in self._groups.values():
            self._fold_group(g)
            for run in _runs(g.sites, lambda a: a.open_step):
                if run[0].open_step is not None:
                    lo, hi = run[0].pos, run[-1].pos + 1
                    self._close(run, [run[0].open_step], g.open_sum[lo:hi, None])
                    for a in run:
                        a.open_step = None
            g.batch_top = torch.topk(g.prompt_sum, self.k, dim=-1).indices
        self._folded = True

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    def _fold_group(self, g: _Group) -> None:
        """Fold the held updates of a group, neighbouring sites with matching updates at once."""
        held = [a for a in g.sites if a.pending]
        for run in _runs(held, _Site.fold_key):
            self._fold_run(g, run)
        g.ready = 0

    def _fold_run(self, g: _Group, run: list[_Site]) -> None:
        """Fold the held reductions of neighbouring sites with matching updates, all at once.

        A fixed set of ~30 kernels, however many sites the run has. Rows of all held updates are
        concatenated (updates may differ in row count; then, or with explicit prompt ids, the run
        is one site).
        """
        pend = run[0].pending
        lo, hi, dev, C = run[0].pos, run[-1].pos + 1, self.device, g.channels
        sizes = [x[2].shape[0] for x in pend]
        n = sum(sizes)
        cat = lambda j: torch.cat([x[j] for a in run for x in a.pending]).to(dev).view(len(run), n, C)  # noqa: E731
        sums, l1, linf = cat(2), cat(3), cat(4).float()  # [sites, N, C]
        tokens = [x[5] for x, r in zip(pend, sizes) for _ in range(r)]
        if len(set(tokens)) == 1:
            per_token = 1.0 / tokens[0]
        else:
            per_token = 1.0 / torch.tensor(tokens, dtype=torch.float32, device=dev)[:, None]
        m = sums * per_token  # token means
        absm = m.abs()
        g.sum_abs_m[lo:hi].add_(absm.sum(1))
        g.sum_m[lo:hi].add_(m.sum(1))
        g.sum_mean_abs[lo:hi].add_((l1 * per_token).sum(1))
        top = g.max_abs[lo:hi]
        torch.maximum(top, linf.amax(1), out=top)
        row_steps = [x[0] for x, r in zip(pend, sizes) for _ in range(r)]
        g.nonfinite[lo:hi].index_add_(1, _index(row_steps, dev), (~torch.isfinite(linf).all(2)).int())
        steps = [x[0] for x in pend]
        uniq = sorted(set(steps))
        if all(x[1] is None for x in pend) and len(set(sizes)) == 1:
            per = self._group_regular(absm, steps, sizes[0])
        else:
            per = self._group_general(g, lo, absm[0], pend, sizes, uniq)[None]
        g.prompt_sum[lo:hi].add_(per.sum(1))
        if g.step_sum is not None:
            g.step_sum[lo:hi, uniq[0]:uniq[-1] + 1].add_(_spread(per.sum(2), uniq))
        open_step = run[0].open_step
        if open_step is not None:
            if open_step == uniq[0]:
                per[:, 0] += g.open_sum[lo:hi]
            else:
                self._close(run, [open_step], g.open_sum[lo:hi, None])
        self._close(run, uniq[:-1], per[:, :-1])
        g.open_sum[lo:hi] = per[:, -1]
        for a in run:
            a.clear()
            a.open_step = uniq[-1]

    def _group_regular(self, absm: torch.Tensor, steps: list[int], rows: int) -> torch.Tensor:
        """Per (step, prompt) sums for the default row layout, by reshapes and plain sums.

        Default layout: row r is prompt r (rows <= prompts) or prompt r % prompts (rows a
        multiple of the prompts: uncond and cond rows). Exact and deterministic, unlike
        ``index_add_`` with repeated indices on a GPU.

        Shapes:
            absm: [sites, updates × rows, C] -> [sites, distinct steps, prompts, C].
        """
        P, (S, _, C) = self._batch_prompts, absm.shape
        x = absm.view(S, len(steps), rows, C)
        if rows > P:
            x = x.view(S, len(steps), rows // P, P, C).sum(2)
        elif rows < P:
            x = torch.cat([x, x.new_zeros(S, len(steps), P - rows, C)], 2)
        runs = [len(list(g)) for _, g in itertools.groupby(steps)]
        if len(set(runs)) == 1:  # the same number of calls per step (1, or 2 under true CFG)
            return x.view(S, len(runs), runs[0], P, C).sum(2)
        ends = list(itertools.accumulate(runs))
        return torch.stack([x[:, e - r:e].sum(1) for r, e in zip(runs, ends)], 1)

    def _group_general(
        self, g: _Group, pos: int, absm: torch.Tensor, pend: list[tuple], sizes: list[int], uniq: list[int]
    ) -> torch.Tensor:
        """Per (step, prompt) sums for explicit ``prompt_of_row`` ids (``index_add_``), one site.

        Shapes:
            absm: [rows of all updates, C] -> [distinct steps, prompts, C].
        """
        dev, P, C = self.device, self._batch_prompts, absm.shape[-1]
        # Updates without ids follow the default layout: row r is prompt r % P.
        prow = torch.cat([
            (self._arange(r) % P if x[1] is None else x[1].to(dev)) for x, r in zip(pend, sizes)
        ]).long()
        ok = (prow >= 0) & (prow < P)
        g.bad_prompt[pos:pos + 1].logical_or_(~ok.all())
        at = {st: i for i, st in enumerate(uniq)}
        flat = _index([at[x[0]] for x, r in zip(pend, sizes) for _ in range(r)], dev) * P
        flat = flat + prow.clamp(0, P - 1)
        out = torch.zeros(len(uniq) * P, C, device=dev)
        out.index_add_(0, flat, absm * ok[:, None])
        return out.view(len(uniq), P, C)

    def _close(self, run: list[_Site], steps: list[int], per: torch.Tensor) -> None:
        """Per-step top-k sets of finished steps: one topk for the whole run of sites.

        Shapes:
            per: [sites, len(steps), prompts, C].
        """
        if not steps:
            return
        g, lo, hi = run[0].group, run[0].pos, run[-1].pos + 1
        top = torch.topk(per, self.k, dim=-1).indices.transpose(1, 2)  # [sites, P, W, k]
        if steps == list(range(steps[0], steps[-1] + 1)):
            g.step_sets[lo:hi, :, steps[0]:steps[-1] + 1] = top
        else:
            g.step_sets[lo:hi].index_copy_(2, _index(steps, self.device), top)
        for a in run:
            a.closed.update(steps)

    def end_batch(self) -> None:
        """Close a batch: keep each prompt's top-k set and per-step top-k sets.

        Raises:
            MassactError: for steps without activations. The batch's rows are then partly
                counted, so the accumulator refuses further use. (Prompt ids out of range that
                were given on the device are reported by :meth:`result`.)
        """
        try:
            self._end_batch()
        except MassactError as e:
            self._failed = str(e)
            for a in self._site.values():
                a.in_batch = False
            raise

    def _end_batch(self) -> None:
        self.fold()
        # Nothing is read back here: prompt ids given on the device are checked by result(), in
        # its one transfer. A read here would wait for the generation and leave the GPU idle
        # through everything the host does after it.
        for a in self._site.values():
            a.in_batch = False
        for a in self._site.values():
            missing = sorted(set(range(self.steps)) - a.closed)
            if missing:
                raise MassactError(
                    f"site {a.module}: no activations seen at steps {missing}; the pipeline made "
                    f"fewer transformer calls than the {self.steps} steps asked for"
                )
        for g in self._groups.values():
            # Kept on the device until result(): one transfer for everything.
            g.prompt_sets.append(g.batch_top)
            g.step_sets_done.append(g.step_sets)
            g.bad_sets.append(g.bad_prompt)
            g.prompt_sum = g.open_sum = g.step_sets = g.batch_top = g.bad_prompt = None
        self._batch_sizes.append(self._batch_prompts)
        self._folded = False

    def _require_usable(self) -> None:
        if self._failed is not None:
            raise MassactError(f"a batch of this accumulator failed ({self._failed}); its rows are "
                               "partly counted: accepted: a new StatsAccumulator")

    def _require_open(self) -> None:
        if not all(a.in_batch for a in self._site.values()):
            raise MassactError("no batch is open; accepted: begin_batch, updates, [fold], end_batch")

    def _require_closed(self) -> None:
        if any(a.in_batch for a in self._site.values()):
            raise MassactError("a batch is still open; accepted: end_batch() before result() or the "
                               "next begin_batch()")

    def check_finite(self) -> None:
        """Raise on the earliest (step, layer) whose activations were not finite.

        The earliest one is where the problem starts: non-finite values then reach every later
        block and, through the latents, every later step.
        """
        self._require_closed()
        self._raise_nonfinite(torch.cat([g.nonfinite for g in self._groups.values()]).cpu())

    def _raise_bad_prompt(self, flags: torch.Tensor) -> None:
        """Shapes: flags: [batches, sites in group order]."""
        order = [a.module for g in self._groups.values() for a in g.sites]
        for b, row in enumerate(flags.tolist()):
            for module, wrong in zip(order, row):
                if wrong:
                    p = self._batch_sizes[b]
                    self._failed = (f"site {module}: a prompt_of_row id was out of range in batch {b} "
                                    f"({p} prompts)")
                    raise MassactError(f"{self._failed}; accepted: 0..{p - 1}")

    def _raise_nonfinite(self, flags: torch.Tensor, dtype: str | None = None) -> None:
        """Shapes: flags: [sites in group order, steps]."""
        order = [a.module for g in self._groups.values() for a in g.sites]
        layer = {s.module: i for i, s in enumerate(self.sites)}
        bad = []
        for i in flags.any(1).nonzero().flatten().tolist():
            steps = flags[i].nonzero().flatten().tolist()
            bad.append((steps[0], layer[order[i]], order[i], steps))
        if bad:
            step, _, module, steps = min(bad)
            hint = ("the model overflows in float32 too" if dtype == "float32"
                    else "if the model ran in bfloat16 or float16, try --dtype float32")
            raise MassactError(
                f"non-finite activations at site {module}, step {step} "
                f"(steps affected there: {steps}); {hint}"
            )

    def result(self, meta: dict | None = None) -> ChannelStats:
        """Finish: means, maxima and stability summaries as a :class:`ChannelStats`.

        Everything reaches the host in one transfer; the divisions run there. The per-site
        tensors are rows (views) of per-group host tensors (safetensors saves disjoint views).
        """
        self._require_usable()
        self._require_closed()
        for module, a in self._site.items():
            if a.count == 0:
                raise MassactError(f"site {module}: no samples were accumulated")
        dev: dict[str, torch.Tensor] = {}
        for c, g in self._groups.items():
            dev.update({f"{name}/{c}": getattr(g, name) for name in
                        ("sum_abs_m", "sum_mean_abs", "sum_m", "max_abs", "nonfinite")})
            if g.step_sum is not None:
                dev[f"step_sum/{c}"] = g.step_sum
            dev[f"bad_prompt/{c}"] = torch.stack(g.bad_sets)
            dev[f"prompt_topk/{c}"] = torch.cat(g.prompt_sets, 1)
            dev[f"step_topk/{c}"] = torch.cat(g.step_sets_done, 1)
        host = move_packed(dev, "cpu")  # one transfer, however many sites and dtypes
        self._raise_bad_prompt(torch.cat([host[f"bad_prompt/{c}"] for c in self._groups], 1))
        self._raise_nonfinite(torch.cat([host[f"nonfinite/{c}"] for c in self._groups]),
                              (meta or {}).get("dtype"))
        # Divided per group, then split into per-site rows (views: a row per site costs no copy).
        rows: dict[str, tuple[torch.Tensor, ...]] = {}
        for c, g in self._groups.items():
            count = torch.tensor([[a.count] for a in g.sites], dtype=torch.int64)
            step_count = torch.tensor([a.step_count for a in g.sites], dtype=torch.int64)
            n = count.float()
            per = {
                "abs_mean": host[f"sum_abs_m/{c}"] / n,
                "mean_abs": host[f"sum_mean_abs/{c}"] / n,
                "mean": host[f"sum_m/{c}"] / n,
                # On a CPU the transfer copies nothing: copy, or later batches would change it.
                "max_abs": host[f"max_abs/{c}"].clone(),
            }
            if self.per_step:
                per["per_step_abs_mean"] = host[f"step_sum/{c}"] / step_count.float().clamp_min(1)[..., None]
            per.update({"prompt_topk": host[f"prompt_topk/{c}"], "step_topk": host[f"step_topk/{c}"],
                        "count": count, "step_count": step_count})
            rows.update({f"{name}/{c}": x.unbind(0) for name, x in per.items()})
        t = {f"{name}/{s.module}": rows[f"{name}/{s.channels}"][self._site[s.module].pos]
             for s in self.sites for name in per}  # `per`'s keys are the same for every group
        meta = dict(meta or {})
        meta.update(k=self.k, steps=self.steps, per_step=self.per_step)
        return ChannelStats(sites=list(self.sites), tensors=t, meta=meta)


def _runs(items: list[_Site], key) -> list[list[_Site]]:
    """Maximal runs of neighbouring sites (consecutive positions) with equal, non-None keys."""
    runs: list[list[_Site]] = []
    last = None
    for a in items:
        k = key(a)
        if runs and k is not None and k == last and a.pos == runs[-1][-1].pos + 1:
            runs[-1].append(a)
        else:
            runs.append([a])
        last = k
    return runs


def _spread(x: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Rows of ``x`` (one per step in ``steps``, dim 1) placed on the range ``steps[0]..steps[-1]``.

    Shapes:
        x: [sites, len(steps), C] -> [sites, steps[-1] - steps[0] + 1, C].
    """
    if steps == list(range(steps[0], steps[-1] + 1)):
        return x
    out = x.new_zeros(x.shape[0], steps[-1] - steps[0] + 1, x.shape[2])
    out[:, [st - steps[0] for st in steps]] = x
    return out


#: Pipeline arguments that may hold one entry per prompt (negative prompts, second encoders' prompts).
PER_PROMPT = ("negative_prompt", "negative_prompt_2", "negative_prompt_3", "prompt_2", "prompt_3")


def _merge_extra(a: dict | None, b: dict | None) -> dict | None:
    """Two shards' pipeline extras as one run's: per-prompt lists concatenate, the rest must agree."""
    if a is None and b is None:
        return None
    a, b = dict(a or {}), dict(b or {})
    out = {}
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        if key in PER_PROMPT and isinstance(va, list) and isinstance(vb, list):
            out[key] = va + vb  # each shard's list is one entry per its prompts
        elif va != vb:
            raise MassactError(f"cannot merge: generation extra {key!r} differs ({va!r} vs {vb!r})")
        else:
            out[key] = va
    return out


def _trajectories(meta: dict) -> list[tuple]:
    """Per prompt: (prompt, seed, its per-prompt pipeline entries), what fixes its trajectory."""
    prompts = list(meta.get("prompts", []))
    extra = (meta.get("generation") or {}).get("extra") or {}
    own = {k: v for k, v in extra.items() if k in PER_PROMPT}
    rows = []
    for i, (p, sd) in enumerate(zip(prompts, _prompt_seeds(meta))):
        entries = tuple(sorted((k, str(v[i] if isinstance(v, list) and len(v) == len(prompts) else v))
                               for k, v in own.items()))
        rows.append((p, sd, entries))
    return rows


def _prompt_seeds(meta: dict) -> list:
    """The seed each prompt of a run was generated with (prompt i: ``seed + i``)."""
    if meta.get("prompt_seeds") is not None:
        return list(meta["prompt_seeds"])
    seed = meta.get("seed")
    return [None if seed is None else seed + i for i in range(len(meta.get("prompts", [])))]


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
    def __repr__(self) -> str:
        # The default repr printed every tensor: ~30 KB in a notebook cell for the toy.
        m = self.meta
        widths = sorted({s.channels for s in self.sites})
        span = f"{self.sites[0].module} .. {self.sites[-1].module}" if self.sites else "none"
        return (f"ChannelStats(model={m.get('model')!r}, sites={len(self.sites)} ({span}), "
                f"channels={widths[0] if len(widths) == 1 else widths}, "
                f"prompts={len(m.get('prompts', []))}, steps={m.get('steps')}, k={self.k}, "
                f"per_step={self.has_per_step})")

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

        Raises:
            MassactError: for a statistic that is not one value per channel
                (``per_step_abs_mean``: rank one step's row, ``stat(...)[step]``, with ``top_k``).

        Shapes:
            -> [k].
        """
        x = self.stat(module, stat)
        if x.ndim != 1:
            raise MassactError(f"stat {stat!r} has shape {tuple(x.shape)}, not one value per channel; "
                               "accepted: abs_mean, mean_abs, max_abs or mean (for one step of "
                               "per_step_abs_mean: massact_nn.selection.top_k(stats.stat(site, "
                               "'per_step_abs_mean')[step], k))")
        return top_k(x, self.k if k is None else k)

    def matrix(self, stat: str = "abs_mean") -> torch.Tensor:
        """A statistic stacked over sites (all sites must have the same width).

        Shapes:
            -> [sites, channels]; [sites, steps, channels] for ``per_step_abs_mean``.
        """
        widths = {s.channels for s in self.sites}
        if len(widths) != 1:
            raise MassactError(f"sites have different widths {sorted(widths)}; use stat() per site")
        return torch.stack([self.stat(s.module, stat) for s in self.sites])

    def summary(self, k: int | None = None) -> list[dict]:
        """Per-site summary in layer order: top-k ids, top-1/median ratio, set stability.

        Raises:
            MassactError: for a ``k`` above the run's own: the per-prompt and per-step top-k sets
                the stability is computed on were kept at the run's k only.
        """
        kk = self.k if k is None else k
        if not isinstance(kk, int) or isinstance(kk, bool) or not 1 <= kk <= self.k:
            raise MassactError(f"k={kk!r} is out of range; accepted: 1..{self.k} (the run kept its "
                               f"top-{self.k} sets per prompt and step; collect with a larger k)")
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
        # Everything that changes what was measured must agree (not the prompts or their seeds).
        # The guidance scale is compared as the pipeline used it where both runs know whether it
        # was ignored (a scale FLUX.1-schnell ignores changed nothing); older runs recorded a
        # scale as used even when it was not, so against them the requested scale is compared.
        known = all("guidance_scale_ignored" in m for m in (self.meta, other.meta))
        scale = "guidance_scale_used" if known else "guidance_scale"
        for key in ("model", "steps", "k", "height", "width", "include_uncond", scale,
                    "calls_per_step", "dtype", "architecture"):
            if self.meta.get(key) != other.meta.get(key):
                raise MassactError(
                    f"cannot merge: {key} differs ({self.meta.get(key)!r} vs {other.meta.get(key)!r})"
                )
        # The same prompt with the same seed is the same trajectory: counted twice it would
        # weigh double and fake agreement between the per-prompt top-k sets.
        mine = set(_trajectories(self.meta))
        twice = [t[0] for t in _trajectories(other.meta) if t[1] is not None and t in mine]
        if twice:
            raise MassactError(f"cannot merge: the shards overlap ({len(twice)} prompts with the same "
                               f"seed in both, e.g. {twice[0]!r}); accepted: disjoint shards")
        a, b, t = self.tensors, other.tensors, {}
        for s in self.sites:
            m = s.module
            na, nb = a[f"count/{m}"].double(), b[f"count/{m}"].double()
            for name in ("abs_mean", "mean_abs", "mean"):
                if name == "mean" and not (f"mean/{m}" in a and f"mean/{m}" in b):
                    continue  # a run from before the signed mean was kept: merged without it
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
        merged_extra = _merge_extra(*[(m.get("generation") or {}).get("extra")
                                      for m in (self.meta, other.meta)])
        meta = dict(self.meta)
        if merged_extra is not None:
            meta["generation"] = {**(self.meta.get("generation") or {}), "extra": merged_extra}
        meta["prompts"] = list(self.meta.get("prompts", [])) + list(other.meta.get("prompts", []))
        # Each shard numbered its seeds from its own first prompt: keep them per prompt.
        meta["prompt_seeds"] = _prompt_seeds(self.meta) + _prompt_seeds(other.meta)
        meta["per_step"] = self.has_per_step and other.has_per_step
        # Provenance of the reductions (the forms agree to float32 rounding): both shards' settings.
        if "reduction" in self.meta or "reduction" in other.meta:
            ra, rb = self.meta.get("reduction"), other.meta.get("reduction")
            meta["reduction"] = ra if ra == rb else "mixed"
            shapes = {tuple(x) for m in (self.meta, other.meta) for x in m.get("compiled_shapes") or []}
            meta["compiled_shapes"] = sorted(list(x) for x in shapes)
        if self.has_per_step != other.has_per_step:
            warnings.warn("merge: only one shard kept per-step curves (per_step=True); the merged "
                          "statistics have none", stacklevel=2)
        return ChannelStats(sites=list(self.sites), tensors=t, meta=meta)

    # -- persistence ----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``stats.safetensors`` and ``stats.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        # stats.json last (and gone meanwhile): a save that dies midway leaves no readable mix.
        (folder / "stats.json").unlink(missing_ok=True)
        save_tensors(folder / "stats.safetensors", self.tensors)
        meta = dict(self.meta)
        meta["sites"] = self.summary()
        save_json(folder / "stats.json", meta)
        # A language-model run written here before would otherwise be read back with these.
        (folder / "llm.json").unlink(missing_ok=True)
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
        where = f"{str(folder / 'stats.json')!r}"
        if not isinstance(meta, dict) or not isinstance(meta.get("sites"), list):
            raise MassactError(f"{where} has no site list; accepted: a statistics run folder "
                               "(massact stats --out DIR)")
        try:
            sites = [Site.from_json(d) for d in meta.pop("sites")]
        except (KeyError, TypeError, ValueError) as e:
            raise MassactError(f"{where} has a malformed site entry ({type(e).__name__}: {e})") from None
        tensors = load_tensors(folder / "stats.safetensors")
        missing = [f"{name}/{s.module}" for s in sites for name in ("abs_mean", "mean_abs", "max_abs")
                   if f"{name}/{s.module}" not in tensors]
        if missing:
            raise MassactError(f"{str(folder / 'stats.safetensors')!r} lacks {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}; it does not belong to {where}")
        return cls(sites=sites, tensors=tensors, meta=meta)
