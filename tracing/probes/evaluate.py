"""``massact evaluate``: the paper's three claims with their controls, as one table.

(1) Functional criticality: image change (MSE/PSNR to the undisturbed image, and the judge's
accuracy on the toy) when top-k, lowest-k or random-k channels are zeroed, at several k.
(2) Spatial organisation: mask IoU against the true masks (the segmentation probe's own
evaluation, when that module is installed).
(3) Semantic transfer: how often transport makes the target show the source's foreground colour
and shape while keeping its own background, for top-k channels versus controls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from massact_nn._io import save_json
from massact_nn.errors import MassactError, check_positive_int
from massact_nn.stats import ChannelStats

from ..generation import GenerationConfig, resolve
from ..model import library_versions, model_adapter, model_name
from .common import channel_sets, load_stats
from .disruption import DisruptionConfig, disrupt
from .transport import TransportConfig, transport


@dataclass
class EvaluationConfig:
    """Sizes of the evaluation.

    Attributes:
        ks: k values of the disruption sweep.
        prompts: Prompts per disruption set.
        pairs: Source/target pairs for transport.
        random_draws: Random-k draws per k (disruption, segmentation and transport; a transport
            row averages its draws, seeds ``seed``, ``seed + 1``, ...).
        num_steps: Denoising steps (``None``: the model folder's default).
        height: Image height (``None``: the model folder's default).
        width: Image width (``None``: the model folder's default).
        transport_ks: Channels per site for transport (top/low/random at each k, plus all).
        seed: First generation seed (prompt i uses ``seed + i``); also picks the captions.
        sites: Sites to intervene at (``None``: all).
        transport_steps: Steps to transport at (``None``: all).
        transport_masks: Token masks for transport (``all``, ``union`` of the segmentation
            probe's target and source foregrounds, ...).
        judge: ``True`` (beside the model), ``False``, or a judge folder.
        segmentation: Keyword arguments for the segmentation probe's evaluation (``None``: skip).
    """

    ks: Sequence[int] = (1, 2, 4, 8)
    prompts: int = 16
    pairs: int = 16
    random_draws: int = 3
    num_steps: int | None = None
    height: int | None = None
    width: int | None = None
    transport_ks: Sequence[int] = (4, 16)
    seed: int = 1000
    sites: Sequence[str | int] | None = None
    transport_steps: str | None = None
    transport_masks: Sequence[str] = ("all", "union")
    judge: bool | str = True
    segmentation: dict | None = field(default_factory=dict)


def world_captions(n: int, seed: int) -> list[str]:
    """``n`` captions of the shapes world, drawn reproducibly."""
    from massact_nn import world as W

    caps = W.all_captions()
    rng = np.random.default_rng(seed)
    return [caps[i] for i in rng.choice(len(caps), size=n, replace=n > len(caps))]


def transport_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Source/target caption pairs that differ in every attribute.

    The source's foreground on the target's background is itself a valid world image (the two
    colours differ), so a perfect transport has a well-defined reading.
    """
    from massact_nn import world as W

    rng = np.random.default_rng(seed + 1)
    src, tgt = [], []
    while len(src) < n:
        sizes = (len(W.COLOURS), len(W.SHAPES), len(W.BG_COLOURS))
        a = [int(rng.integers(s)) for s in sizes]
        b = [int(rng.integers(s)) for s in sizes]
        if a[0] in (a[2], b[0], b[2]) or b[0] == b[2] or a[1] == b[1] or a[2] == b[2]:
            continue
        src.append(W.caption_for(*a))
        tgt.append(W.caption_for(*b))
    return src, tgt


def evaluate(model: Any, stats: ChannelStats | str | Path, config: EvaluationConfig | None = None) -> dict:
    """Run the three measurements and return the report (JSON-ready)."""
    config = config or EvaluationConfig()
    _check(config)
    st = load_stats(stats)
    gen = resolve(GenerationConfig(steps=config.num_steps, seed=config.seed, height=config.height,
                                   width=config.width), model, model_adapter(model))
    report: dict = {"config": asdict(config), "model": model_name(model), "num_steps": gen.steps,
                    "size": [gen.height, gen.width], "versions": library_versions(),
                    "stats": str(Path(stats).resolve()) if isinstance(stats, (str, Path)) else None}

    prompts = world_captions(config.prompts, config.seed)
    d = disrupt(model, prompts, st, DisruptionConfig(
        generation=gen, k=list(config.ks), random_draws=config.random_draws, sites=config.sites,
        judge=config.judge, progress=True))
    report["disruption"] = {"prompts": prompts, "summary": d.metrics["summary"],
                            "judge_available": d.meta["judge"]}

    report["segmentation"] = _segmentation(model, st, gen, config)

    src, tgt = transport_pairs(config.pairs, config.seed)
    rows = []
    named: dict = {}
    ks = list(config.transport_ks)
    runs = [(c, k) for k in ks for c in ("top", "low", "random")] + [("all", 0)]
    draws = {"random": config.random_draws}
    bar = tqdm(total=len(config.transport_masks) * sum(draws.get(c, 1) for c, _ in runs),
               desc="transport", unit="run")
    for mask in config.transport_masks:
        for control, k in runs:
            found = []
            for d in range(draws.get(control, 1)):  # random-k: draws with seeds seed, seed + 1, ...
                if control == "all":
                    chans = {s.module: torch.arange(s.channels) for s in st.sites}
                else:
                    chans = channel_sets(st, st.sites, control, k, seed=config.seed + d)
                spec = named.get(mask, mask)
                cfg = TransportConfig(generation=gen, channels=chans, sites=config.sites, k=ks[0],
                                      steps=config.transport_steps, token_mask=spec,
                                      judge=config.judge, progress=False)
                r = transport(model, src, tgt, st, cfg)
                named[mask] = r.token_mask  # segment once per mask, reuse for the controls
                bar.update(1)
                m = r.metrics
                found.append({"mse_to_source": m["to_source"]["all"], "mse_to_target": m["to_target"]["all"],
                              "mse_to_target_outside": m["to_target"]["outside"],
                              "moved": m.get("moved"), "kept": m.get("kept")})
            rows.append({"mask": mask, "token_fraction": m["token_fraction"],
                         "channels": control if control == "all" else f"{control}-{k}",
                         "draws": len(found), **_mean_rows(found), "already": m.get("already")})
    bar.close()
    report["transport"] = {"pairs": list(zip(src, tgt)), "rows": rows}
    return report


def _check(config: EvaluationConfig) -> None:
    """Every count at least 1, before anything runs (a bad one used to fail after the disruption)."""
    for name in ("prompts", "pairs", "random_draws"):
        check_positive_int(name, getattr(config, name))
    for name in ("ks", "transport_ks"):
        v = list(getattr(config, name))
        if not v:
            raise MassactError(f"{name}=[] is empty; accepted: one or more integers >= 1")
        for k in v:
            check_positive_int(f"{name} entry", k)
    if not list(config.transport_masks):
        raise MassactError("transport_masks is empty; accepted: one or more token masks "
                           "('all', 'union', ...)")


def _mean_rows(rows: list[dict]) -> dict:
    """Field-wise means of metric rows (nested dicts too); ``None`` where any row has none."""
    out: dict = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if any(v is None for v in vals):
            out[key] = None
        elif isinstance(vals[0], dict):
            out[key] = _mean_rows(vals)
        else:
            out[key] = sum(float(v) for v in vals) / len(vals)
    return out


def _segmentation(model: Any, stats: ChannelStats, gen: GenerationConfig, config: EvaluationConfig) -> dict:
    if config.segmentation is None:
        return {"available": False, "note": "skipped (segmentation=None)"}
    from .segmentation import evaluate_segmentation

    kw = {"num_steps": gen.steps, "random_draws": config.random_draws,
          "sites": config.sites, **config.segmentation}
    return {"available": True, **evaluate_segmentation(model, stats, **kw)}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(report: dict) -> str:
    """The report as markdown tables."""
    lines = [f"# Evaluation on {report.get('model')} ({report.get('num_steps')} steps)", ""]
    d = report["disruption"]
    lines += ["## 1. Disruption (zeroing k channels at every site and step)", "",
              "| set | k | draws | MSE to baseline | PSNR (dB) | judge all-three | fg colour | shape "
              "| bg colour |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in d["summary"]:
        j = r.get("judge") or {}
        lines.append(f"| {r['control']} | {r['k']} | {r['draws']} | {_fmt(r['mse'])} | {_fmt(r['psnr'])} | "
                     f"{_fmt(j.get('all_three'))} | {_fmt(j.get('fg_colour'))} | {_fmt(j.get('shape'))} | "
                     f"{_fmt(j.get('bg_colour'))} |")
    lines += ["", "## 2. Segmentation (mask IoU against the true masks)", ""]
    seg = report["segmentation"]
    if not seg.get("available"):
        lines.append(f"Not measured here: {seg.get('note')}.")
    else:
        rest = {k: v for k, v in seg.items() if k != "available"}
        lines.append(seg.get("markdown") or "```\n" + str(rest) + "\n```")
    lines += ["", "## 3. Transport (source channels into the target at every site and step)", "",
              "Token mask `all`: every image token; `union`: the segmentation probe's foreground "
              "masks of target and source, united. Moved = the judge reads the source's attribute "
              "on the result; kept = it reads the target's background colour.", "",
              "| mask (token fraction) | channels | draws | MSE to source | MSE to target | ... outside p "
              "| fg colour moved | shape moved | bg kept |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = report["transport"]["rows"]
    masks = list(dict.fromkeys(r["mask"] for r in rows))
    for mask in masks:
        al = next((r.get("already") for r in rows if r["mask"] == mask), None)
        if al:  # the control without transport: the untouched target read against the source
            lines.append(f"| {mask} | none (target as is) | – | – | 0 | 0 | {_fmt(al.get('fg_colour'))} | "
                         f"{_fmt(al.get('shape'))} | 1 |")
    for r in rows:
        mv, kp = r.get("moved") or {}, r.get("kept") or {}
        lines.append(f"| {r['mask']} ({_fmt(r['token_fraction'])}) | {r['channels']} | {r.get('draws', 1)} | "
                     f"{_fmt(r['mse_to_source'])} | {_fmt(r['mse_to_target'])} | "
                     f"{_fmt(r['mse_to_target_outside'])} | {_fmt(mv.get('fg_colour'))} | "
                     f"{_fmt(mv.get('shape'))} | {_fmt(kp.get('bg_colour'))} |")
    return "\n".join(lines) + "\n"


def save_evaluation(report: dict, folder: str | Path) -> str:
    """Write ``evaluation.json`` and ``evaluation.md``; return the markdown."""
    folder = Path(folder)
    save_json(folder / "evaluation.json", report)
    md = to_markdown(report)
    from massact_nn._io import atomic_write

    def write(tmp: str) -> None:
        Path(tmp).write_text(md, encoding="utf-8")

    atomic_write(folder / "evaluation.md", write)
    return md
