"""Synthetic probe results with known content, for the viewer and report tests (no model)."""

from __future__ import annotations

import torch

from massact_nn.disruption import DisruptionResult
from massact_nn.segmentation_result import SegmentationResult
from massact_nn.sites import Site
from massact_nn.stats import ChannelStats, StatsAccumulator
from massact_nn.transport import TransportResult

SIZE, GRID = 32, (16, 16)

PLANT = {0: 7, 1: 7, 2: 3}  # layer -> planted massive channel


def synthetic_stats(
    n_sites=3, channels=16, steps=3, per_step=True, seed=0, model="/m/tiny-a"
) -> ChannelStats:
    """Statistics with a planted top-1 channel per layer (PLANT), growing with depth and step."""
    g = torch.Generator().manual_seed(seed)
    sites = [Site(i, f"transformer_blocks.{i}", channels, kind="double") for i in range(n_sites)]
    acc = StatsAccumulator(sites, steps=steps, k=3, per_step=per_step)
    acc.begin_batch(2)
    for step in range(steps):
        for s in sites:
            h = torch.randn(2, 10, channels, generator=g)
            # A channel whose mean grows with depth and step: a known top-1 at every site.
            h[..., PLANT.get(s.layer, 5)] += 40.0 * (1 + s.layer) * (1 + step)
            acc.update(s.module, step, h)
    acc.end_batch()
    return acc.result({"model": model, "prompts": ["a", "b"], "seed": 0})


def disc(size: int, r: float = 0.3) -> torch.Tensor:
    """A centred disc. Shapes: -> [size, size] bool."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    return ((x - c) ** 2 + (y - c) ** 2) <= (r * size) ** 2


def picture(fg=(0.9, 0.1, 0.1), bg=(0.1, 0.2, 0.9)) -> torch.Tensor:
    """A disc of one colour on another. Shapes: -> [3, SIZE, SIZE]."""
    m = disc(SIZE)[None].float()
    return torch.tensor(fg).view(3, 1, 1) * m + torch.tensor(bg).view(3, 1, 1) * (1 - m)


def disruption_result() -> DisruptionResult:
    g = torch.Generator().manual_seed(0)
    base = torch.stack([picture(), picture((0.1, 0.8, 0.1), (0.9, 0.9, 0.2))])
    sets = ["none", "top_k2", "low_k2", "random0_k2"]
    noise = {"none": 0.0, "top_k2": 0.5, "low_k2": 0.01, "random0_k2": 0.02}
    images = {s: (base + noise[s] * torch.randn(base.shape, generator=g)).clamp(0, 1) for s in sets}
    channels = {"none": {}, "top_k2": {"transformer_blocks.0": torch.tensor([5, 2])},
                "low_k2": {"transformer_blocks.0": torch.tensor([11, 3])},
                "random0_k2": {"transformer_blocks.0": torch.tensor([8, 30])}}
    per = {}
    for s in sets:
        e = ((images[s] - base) ** 2).mean((1, 2, 3))
        per[s] = {"control": s.split("_")[0].rstrip("0"), "k": 0 if s == "none" else 2, "draw": 0,
                  "mse": float(e.mean()), "psnr": None if s == "none" else float((-10 * e.log10()).mean()),
                  "per_image": {"mse": e.tolist()}, "judge": {"colour": 1.0 if s != "top_k2" else 0.5}}
    summary = [{"control": r["control"], "k": r["k"], "draws": 1, "mse": r["mse"], "mse_std": 0.0,
                "psnr": r["psnr"], "judge": r["judge"]} for r in per.values()]
    meta = {"model": "/m/tiny", "prompts": ["a red circle on blue", "a <b>green</b> circle"],
            "mode": "zero", "steps": [0, 1], "seed": 0}
    return DisruptionResult(images=images, channels=channels,
                            metrics={"sets": per, "summary": summary}, meta=meta)


def segmentation_result() -> tuple[SegmentationResult, torch.Tensor]:
    """A result whose ``top`` masks are the true disc and ``random`` ones are stripes."""
    truth_px = disc(SIZE)
    truth = truth_px.float().reshape(16, 2, 16, 2).mean((1, 3)) > 0.5
    stripes = torch.zeros(GRID, dtype=torch.bool)
    stripes[:, ::2] = True
    per_block = {}
    for m in ("transformer_blocks.0", "single_transformer_blocks.0"):
        for st in (1, 3):
            per_block[f"top/{m}/{st}"] = truth.clone()
            per_block[f"random/{m}/{st}"] = stripes.clone()
    per_block["top/transformer_blocks.0/1"][0, 0] = True  # one block differs from the truth
    res = SegmentationResult(
        aggregated={"top": truth.clone(), "random": stripes.clone()}, per_block=per_block,
        channels={"top/transformer_blocks.0": torch.tensor([5, 2]),
                  "top/single_transformer_blocks.0": torch.tensor([5, 8]),
                  "random/transformer_blocks.0": torch.tensor([1, 9]),
                  "random/single_transformer_blocks.0": torch.tensor([4, 7])},
        baselines={"centre": truth.clone()}, primary="top", image_size=(SIZE, SIZE),
        image=picture(), meta={"model": "/m/tiny", "prompt": "a red circle on blue",
                               "sites": ["transformer_blocks.0", "single_transformer_blocks.0"]},
    )
    return res, truth_px


def transport_result() -> TransportResult:
    src, tgt = picture((0.9, 0.9, 0.2), (0.1, 0.2, 0.9)), picture()
    m = disc(SIZE)
    res = torch.where(m[None], src, tgt)
    p = m.float().reshape(16, 2, 16, 2).mean((1, 3)) > 0.5
    return TransportResult(
        source=src[None], target=tgt[None], result=res[None], token_mask=p,
        channels={"transformer_blocks.0": torch.tensor([5, 2]), "transformer_blocks.1": torch.tensor([5, 8])},
        metrics={"to_source": {"inside": 0.001, "outside": 0.3},
                 "to_target": {"inside": 0.4, "outside": 0.0}},
        meta={"model": "/m/tiny", "source_prompts": ["a yellow circle"], "target_prompts": ["a red circle"],
              "seed": 0},
    )
