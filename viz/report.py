"""The self-contained HTML report: every figure, table and image the given run folders support.

Run folders are recognised by the files in them (``stats.json`` + ``stats.safetensors`` for
statistics; ``metrics.json`` / ``meta.json`` and PNGs for probe runs). A folder with none of those
but with run folders inside it (e.g. the output of ``massact demo``) is expanded one level.
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from massact_nn._io import load_json, write_text
from massact_nn.errors import MassactError
from massact_nn.stats import ChannelStats

from . import html as H
from .sections import generic_section, probe_kind, probe_section, stats_section
from .stats import massive_profile


@dataclass
class Run:
    """One recognised run folder."""

    path: Path
    kind: str  # "stats" | "probe"
    meta: dict = field(default_factory=dict)


def is_stats_run(folder: Path) -> bool:
    """Whether ``folder`` holds saved :class:`ChannelStats`."""
    return (folder / "stats.json").is_file() and (folder / "stats.safetensors").is_file()


def is_probe_run(folder: Path) -> bool:
    """Whether ``folder`` holds a probe run (``metrics.json`` or ``meta.json``)."""
    return (folder / "metrics.json").is_file() or (folder / "meta.json").is_file()


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Recognise run folders (expanding a folder of run folders one level), in the given order.

    Raises:
        MassactError: for a folder that does not exist or holds no run.
    """
    runs: list[Run] = []
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            what = "is a file, not a folder" if p.exists() else "does not exist"
            raise MassactError(
                f"run folder {str(f)!r} {what}; accepted: folders written by "
                "`massact stats/disrupt/segment/transport --out DIR`"
            )
        found = _classify(p)
        if found is None:
            subs = [c for c in sorted(p.iterdir()) if c.is_dir() and _classify(c) is not None]
            if not subs:
                raise MassactError(
                    f"no results in {str(f)!r}; expected stats.json + stats.safetensors, or a "
                    "probe's metrics.json, in it or in its sub-folders"
                )
            # A demo folder reads best as the paper argues: statistics, then the probes.
            found_runs = [_classify(c) for c in subs]
            runs += sorted(found_runs, key=lambda r: (_KIND_ORDER.get(_kind(r), 9), r.path.name))
        else:
            runs.append(found)
    return runs


_KIND_ORDER = {"stats": 0, "disruption": 1, "segmentation": 2, "transport": 3}


def _kind(run: Run) -> str:
    return run.kind if run.kind in ("stats", "unreadable") else probe_kind(run.path, run.meta)


def _classify(p: Path) -> Run | None:
    try:
        if is_stats_run(p):
            return Run(p, "stats", load_json(p / "stats.json"))
        if is_probe_run(p):
            meta = load_json(p / "meta.json") if (p / "meta.json").is_file() else {}
            return Run(p, "probe", meta if isinstance(meta, dict) else {})
    except (ValueError, OSError) as e:  # a half-written or foreign file: shown, not fatal
        return Run(p, "unreadable", {"error": f"{type(e).__name__}: {e}"})
    return None


def _section(run: Run, anchor: str) -> tuple[str, list[str]]:
    """A run's section; a folder that cannot be read gets a section saying why, not a crash."""
    error = run.meta.get("error") if run.kind == "unreadable" else None
    if error is None:
        try:
            return (stats_section(run.path, anchor) if run.kind == "stats"
                    else probe_section(run.path, run.meta, anchor))
        except Exception as e:  # noqa: BLE001 (one bad folder must not take the report down)
            error = f"{type(e).__name__}: {e}"
    name, parts = generic_section(run.path, {}, anchor)
    return name, parts[:1] + [H.paragraph(f"(This folder could not be read: {error}; showing its "
                                          "files.)")] + parts[1:]


def _anchor(i: int, run: Run) -> str:
    return f"run-{i}-{run.path.name}".replace(" ", "-")


def build_report(folders: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write one self-contained HTML report of the given run folders (atomically).

    Args:
        folders: Run folders (statistics or probe runs), or folders of run folders.
        out: The HTML file to write.
        title: Page title (default: "massact-nn report").

    Returns:
        The written path.
    """
    if Path(out).is_dir():
        raise MassactError(f"out={str(out)!r} is a folder; accepted: the path of the HTML file to write")
    runs = find_runs(folders)
    title = title or "massact-nn report"
    body = [H.heading(1, title),
            H.paragraph(f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from "
                        f"{len(runs)} run folder(s). Hover over any figure for site, layer, "
                        "channel and value.")]
    toc = []
    sections: list[str] = []
    stats_runs, loaded = [], []
    for r in runs:
        if r.kind == "stats":
            try:
                loaded.append(ChannelStats.load(r.path))
                stats_runs.append(r)
            except Exception:  # noqa: BLE001 (its own section says why)
                pass
    if len(stats_runs) > 1:
        toc.append(("compare", "Profiles compared (normalised depth)"))
        labels = [f"{r.path.name} ({Path(str(r.meta.get('model', '?'))).name})" for r in stats_runs]
        sections += [H.heading(2, "Profiles compared (normalised depth)", "compare"),
                     H.figure(massive_profile(loaded, labels=labels, normalized_depth=True))]
    for i, run in enumerate(runs):
        anchor = _anchor(i, run)
        name, parts = _section(run, anchor)
        toc.append((anchor, name))
        sections += parts
    nav = "<nav><ul>" + "".join(
        f'<li><a href="#{_html.escape(a)}">{_html.escape(t)}</a></li>' for a, t in toc
    ) + "</ul></nav>"
    text = H.page(title, body + [nav] + sections)
    return write_text(out, text)


