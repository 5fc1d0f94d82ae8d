"""The benchmarked cases: each is a function of a loaded :class:`Bench`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Bench:
    model: Any  # nnsight DiffusionModel
    tokens: int
    steps: int
    side: int
    device: str
    sites: int = 0
    width: int = 0
    extra: dict = field(default_factory=dict)
    stats: Any = None

    @classmethod
    def load(cls, folder: Path, tokens: int, steps: int, device: str, dtype: str) -> Bench:
        from massact_nn.tracing.model import load_model
        from massact_nn.tracing.sites import sites_of

        model = load_model(folder, device, dtype)
        # Pixels per token side: the VAE's downsampling, then Flux packs 2x2 latents into a token
        # (4 for the tiny builds, 2 for the toy, whose VAE keeps the resolution).
        side = int(round(tokens ** 0.5)) * 2 * int(model.pipeline.vae_scale_factor)
        b = cls(model, tokens, steps, side, device)
        found = sites_of(model)
        b.sites, b.width = len(found), found[0].channels
        return b

    def kwargs(self, n: int = 1, seed: int = 0) -> dict:
        gens = [torch.Generator(self.device).manual_seed(seed + i) for i in range(n)]
        return dict(num_inference_steps=self.steps, height=self.side, width=self.side,
                    max_sequence_length=16, generator=gens, output_type="latent")

    def gen(self):
        from massact_nn.tracing.generation import GenerationConfig

        return GenerationConfig(steps=self.steps, seed=0, height=self.side, width=self.side,
                                batch_size=1, extra={"max_sequence_length": 16})

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


PROMPT = ["a red circle on a blue background"]


def plain(b: Bench) -> None:
    b.model.pipeline(PROMPT, **b.kwargs())


def plain_images(b: Bench) -> None:
    """The plain pipeline with the VAE decode: the probes return images, so this is their baseline."""
    b.model.pipeline(PROMPT, **{**b.kwargs(), "output_type": "pt"})


def nnsight_empty(b: Bench) -> None:
    with b.model.generate(PROMPT, **b.kwargs()):
        pass


def stats(b: Bench, reduction: str = "eager") -> None:
    """``collect_stats`` at every site and step, eager reductions: what the default
    ``reduction="auto"`` runs for a run this short. Named explicitly, because "auto" would take
    the compiled kernel once ``stats_fused`` has compiled the shape in this process."""
    from massact_nn.tracing.stats import StatsConfig, collect_stats

    b.stats = collect_stats(b.model, PROMPT, StatsConfig(b.gen(), progress=False, reduction=reduction))


def stats_fused(b: Bench) -> None:
    """``stats`` with ``reduction="compiled"``: one compiled reduction per site (GPU only; on a
    CPU it is ``stats``)."""
    stats(b, "compiled")


def naive_save_all(b: Bench) -> None:
    """What a user writes first: save every block output with nnsight, reduce afterwards."""
    tr = b.model.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    saved: list = []
    with b.model.generate(PROMPT, **b.kwargs()) as tracer:
        for _ in tracer.iter[: b.steps]:
            for blk in blocks:
                saved.append(blk.output[1].clone())
    stored = sum(x.numel() * x.element_size() for x in saved)
    torch.stack([x.float().mean(1).abs() for x in saved]).sum(0)
    b.extra["naive_save_all"] = {"stored_MiB": round(stored / 2**20, 1)}


def _stats_for_probes(b: Bench):
    if b.stats is None:
        stats(b)
    return b.stats


def disrupt_all(b: Bench) -> None:
    """Zero the top-4 channels at every site and step (one generation, no controls)."""
    from massact_nn.tracing.probes.common import make_plan
    from massact_nn.tracing.probes.disruption import generate_images

    st = _stats_for_probes(b)
    plan = make_plan(b.model, b.gen())
    edit = {s.module: (st.top(s.module, 4), None) for s in plan.sites}
    generate_images(b.model, plan, PROMPT, edit, "zero")


def plain_pair(b: Bench) -> None:
    """Two plain generations in one batch, decoded: what a two-row batched transport runs."""
    b.model.pipeline(PROMPT * 2, **{**b.kwargs(2), "output_type": "pt"})


def plain_triple(b: Bench) -> None:
    """Three rows in one batch, decoded (source, untouched target, result): the default probe's layout."""
    b.model.pipeline(PROMPT * 3, **{**b.kwargs(3), "output_type": "pt"})


def _transport(b: Bench, mode: str, control: bool = True) -> None:
    from massact_nn.tracing.probes.transport import TransportConfig, transport

    st = _stats_for_probes(b)
    cfg = TransportConfig(generation=b.gen(), k=4, mode=mode, control=control, judge=False, progress=False)
    res = transport(b.model, PROMPT[0], "a green square on a yellow background", st, cfg)
    if mode == "two_pass" and control:
        full = max(res.meta["full_bytes"], 1)
        b.extra["transport_two_pass"] = {
            "stored_KiB": round(res.meta["stored_bytes"] / 1024, 1),
            "full_KiB": round(full / 1024, 1),
            "stored/full": round(res.meta["stored_bytes"] / full, 5),
        }


def transport_batched(b: Bench) -> None:
    """[source; untouched target; result] rows: the probe's default, with its control."""
    _transport(b, "batched")


def transport_batched_2row(b: Bench) -> None:
    """[source; result] rows (``control=False``): the least a batched transport can run."""
    _transport(b, "batched", control=False)


def transport_two_pass(b: Bench) -> None:
    _transport(b, "two_pass")


def transport_two_pass_2row(b: Bench) -> None:
    """Two-pass without the control: one source row, then one result row."""
    _transport(b, "two_pass", control=False)


GPU_ONLY = {"stats_fused"}  # the same as another case on a CPU: not run there by default

CASES: dict[str, Callable[[Bench], None]] = {
    "plain": plain,
    "plain_images": plain_images,
    "nnsight_empty": nnsight_empty,
    "stats": stats,
    "stats_fused": stats_fused,
    "naive_save_all": naive_save_all,
    "disrupt_all": disrupt_all,
    "plain_pair": plain_pair,
    "plain_triple": plain_triple,
    "transport_batched": transport_batched,
    "transport_batched_2row": transport_batched_2row,
    "transport_two_pass": transport_two_pass,
    "transport_two_pass_2row": transport_two_pass_2row,
}
