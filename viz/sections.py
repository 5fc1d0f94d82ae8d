"""Report sections, one per kind of run folder (statistics, disruption, segmentation, transport).

Each returns ``(table-of-contents name, HTML parts)``. A probe folder whose result does not load
(an older or newer format) still gets a generic section: its PNGs, metrics and metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from massact_nn._io import load_json
from massact_nn.disruption import DisruptionResult
from massact_nn.segmentation_result import SegmentationResult
from massact_nn.stats import ChannelStats
from massact_nn.transport import TransportResult

from . import html as H
from .masks import mask_overview, mask_viewer
from .probes import disruption_grid, disruption_metrics, disruption_sets_by_k, transport_strip
from .stats import channel_heatmap, massive_profile, step_evolution
from .steps import step_heatmap

#: The metadata keys of the summary table, as the probes write them (``probe_meta`` extras).
META_KEYS = ("model", "architecture", "transformer_class", "versions", "prompts", "prompt",
             "caption", "image", "image_file", "source_prompts", "target_prompts", "source_image",
             "seed", "steps", "num_steps", "sites", "height", "width", "guidance_scale", "mode",
             "alpha", "k", "channel_sets", "token_mask", "features", "foreground", "aggregation",
             "dtype", "device")
#: Above this width the full heatmap has sub-pixel columns: show the top channels first.
WIDE = 256
TRUTH_FILES = ("gt_mask.png", "true_mask.png", "truth.png")


def probe_kind(folder: Path, meta: dict) -> str:
    """``disruption`` | ``segmentation`` | ``transport`` | ``probe`` (unknown: generic section)."""
    kind = meta.get("kind")
    if kind in ("disruption", "segmentation", "transport"):
        return kind
    if "primary" in meta and "image_size" in meta and (folder / "result.safetensors").is_file():
        return "segmentation"
    return "probe"


def stats_section(folder: Path, anchor: str) -> tuple[str, list[str]]:
    """Profile, heatmap, per-step evolution and the per-site table of one statistics run."""
    stats = ChannelStats.load(folder)
    name = f"Statistics · {folder.name}"
    out = [H.heading(2, name, anchor),
           H.paragraph(f"{len(stats.sites)} sites, {len(stats.meta.get('prompts', []))} prompts, "
                       f"{stats.meta.get('steps')} steps. Folder: {folder}")]
    out += [H.heading(3, "Massive-activation profile"),
            H.paragraph("Top-1, top-2, top-3 and median channel per layer; a massive channel "
                        "sits orders of magnitude above the median."),
            H.figure(massive_profile(stats)),
            H.heading(3, "Channels × layers"),
            H.paragraph("Log colour scale; circles mark each layer's top-k channels. The "
                        "dropdown switches the statistic.")]
    if max(s.channels for s in stats.sites) > WIDE:
        out += [H.paragraph("Only the channels that are top-k at some layer (a full-width "
                            "heatmap follows; zoom in with the mouse)."),
                H.figure(channel_heatmap(stats, channels="top"))]
    out += [H.figure(channel_heatmap(stats))]
    if stats.has_per_step:
        out += [H.heading(3, "Per-step evolution of the top channels"),
                H.paragraph("The slider picks the site (layer)."),
                H.figure(step_evolution(stats))]
        n = min(16, min(s.channels for s in stats.sites))
        if int(stats.meta.get("steps") or 0) >= 4:
            out += [H.paragraph(f"The same as steps × channels for the top-{n} channels, on one "
                                "colour scale for every site."),
                    H.figure(step_heatmap(stats, n_channels=n))]
    if (folder / "llm.json").is_file():  # a language-model run (`massact llm-stats`)
        from massact_nn.llm_stats import TokenPositions

        from .llm import position_rows, token_extremes

        pos = TokenPositions.from_json(load_json(folder / "llm.json"))
        out += [H.heading(3, "Largest activations by token"),
                H.paragraph("Single entries |h| (not channel means): the top-1/2/3 of a sequence "
                            "against the layer median, and where they sit (token@position, "
                            "channel)."),
                H.figure(token_extremes(pos)), H.table(position_rows(pos))]
    out += [H.heading(3, "Per-site summary"),
            H.table(stats.summary(), ["layer", "module", "kind", "channels", "top",
                                      "ratio_top1_median", "ratio_top1_median_mean_abs",
                                      "jaccard_prompts", "jaccard_steps"]),
            H.heading(3, "Run metadata"),
            H.metadata(stats.meta, META_KEYS)]
    return name, out


def probe_section(folder: Path, meta: dict, anchor: str) -> tuple[str, list[str]]:
    """The section of a probe run: its viewer when the result loads, else a generic one."""
    kind = probe_kind(folder, meta)
    builders = {"disruption": _disruption, "segmentation": _segmentation, "transport": _transport}
    if kind in builders:
        try:
            return builders[kind](folder, anchor)
        except Exception as e:  # noqa: BLE001 (any unreadable result falls back to its files)
            name, parts = generic_section(folder, meta, anchor)
            return name, parts[:1] + [H.paragraph(f"(The {kind} viewer could not read this "
                                                  f"folder: {e}; showing its files.)")] + parts[1:]
    return generic_section(folder, meta, anchor)


def _disruption(folder: Path, anchor: str) -> tuple[str, list[str]]:
    r = DisruptionResult.load(folder)
    name = f"Disruption · {folder.name}"
    out = [H.heading(2, name, anchor),
           H.paragraph("Each column generates the same prompts from the same seeds with one "
                       "channel set disrupted; 'none' is the undisturbed baseline. Top-k should "
                       "hurt far more than the low-k and random-k controls.")]
    bad = {n: row.get("non_finite") for n, row in ((r.metrics or {}).get("sets") or {}).items()
           if row.get("non_finite")}
    if bad:
        out.append(H.paragraph(
            "Not finite: " + ", ".join(f"{n} ({c} image{'s' if c > 1 else ''})" for n, c in bad.items())
            + ". The disruption produced NaN or infinite pixels there (drawn magenta); their MSE, "
            "PSNR and judge readings are not finite and no bar is drawn for them."))
    groups = disruption_sets_by_k(r)
    for k, sets in groups.items():
        if len(groups) > 1:
            out.append(H.heading(3, f"k = {k}"))
        out.append(H.figure(disruption_grid(r, sets=sets)))
    summary = (r.metrics or {}).get("summary")
    if summary:
        out += [H.figure(disruption_metrics(r)), H.heading(3, "Metrics per channel set"),
                H.table([_flat(row) for row in summary])]
    out += [H.heading(3, "Run metadata"), H.metadata(r.meta, META_KEYS)]
    return name, out


def _segmentation(folder: Path, anchor: str) -> tuple[str, list[str]]:
    r = SegmentationResult.load(folder)
    truth = _truth(folder, r)
    name = f"Segmentation · {folder.name}"
    out = [H.heading(2, name, anchor),
           H.paragraph("K=2 clustering of the image tokens restricted to each channel set gives a "
                       "foreground mask (outlined; background dimmed). Controls: all channels, "
                       "random-k, lowest-k, and trivial baselines."
                       + (" IoU is against the true mask." if truth is not None else "")),
           H.figure(mask_overview(r, truth))]
    if r.per_block:
        out += [H.heading(3, "Masks per block"),
                H.paragraph("The sliders pick the site and the denoising step."),
                H.figure(mask_viewer(r, truth))]
    if (folder / "metrics.json").is_file():
        m = load_json(folder / "metrics.json")
        out += [H.heading(3, "Metrics"), H.metrics_tables(m)]
    out += [H.heading(3, "Run metadata"), H.metadata(r.meta, META_KEYS)]
    return name, out


def _truth(folder: Path, r: SegmentationResult) -> torch.Tensor | None:
    """The true mask: a PNG in the folder, or the ``--gt-mask`` file named in ``metrics.json``."""
    from massact_nn.masks import load_png_mask

    candidates = []
    if (folder / "metrics.json").is_file():  # the mask the run was scored against comes first
        gt = load_json(folder / "metrics.json").get("gt_mask")
        if isinstance(gt, str):
            candidates.append(Path(gt))
    candidates += [folder / f for f in TRUTH_FILES]
    for f in candidates:
        if f.is_file():
            return load_png_mask(f, tuple(r.image_size))
    return None


def _transport(folder: Path, anchor: str) -> tuple[str, list[str]]:
    r = TransportResult.load(folder)
    name = f"Transport · {folder.name}"
    out = [H.heading(2, name, anchor),
           H.paragraph("The source's massive channels replace the target's under M = p mᵀ (p: "
                       "token mask, outlined, tokens outside it dimmed; m: the channels listed on "
                       "hover). The result should take the source's foreground semantics inside p "
                       "and keep the target outside."),
           H.figure(transport_strip(r)), H.heading(3, "Metrics"), H.metrics_tables(r.metrics),
           H.heading(3, "Run metadata"), H.metadata(r.meta, META_KEYS)]
    return name, out


def generic_section(folder: Path, meta: dict, anchor: str) -> tuple[str, list[str]]:
    """Any probe folder: PNGs inline, ``metrics.json`` as a table, metadata."""
    name = f"Probe run · {folder.name}"
    parts = [H.heading(2, name, anchor)]
    pngs = sorted(folder.glob("*.png"))
    if pngs:
        parts.append(H.gallery([(p.stem, p) for p in pngs]))
    if (folder / "metrics.json").is_file():
        metrics = load_json(folder / "metrics.json")
        parts.append(H.metrics_tables(metrics if isinstance(metrics, dict) else {"metrics": metrics}))
    if meta:
        parts.append(H.metadata(meta, META_KEYS))
    return name, parts


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out
