"""HTML building blocks of the self-contained report: page shell, figures, tables, images.

plotly.js is embedded exactly once, in the page head, so the file opens offline and every
figure's own script only calls ``Plotly.newPlot``. A small error catcher runs before anything else
and shows any JavaScript error in a red banner at the top (and records it in
``#massact-js-errors`` for the headless-browser test), so a broken figure is never silent.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from ._common import compact_ints, fmt, png_data_uri

_ERROR_CATCHER = """
<script>
(function () {
  var errs = [];
  function show(msg) {
    errs.push(String(msg));
    var box = document.getElementById('massact-js-errors');
    if (box) { box.textContent = errs.join('\\n'); box.style.display = 'block'; }
  }
  window.addEventListener('error', function (e) { show('Uncaught ' + (e.message || e)); });
  window.addEventListener('unhandledrejection', function (e) {
    show('Unhandled rejection ' + e.reason);
  });
  var orig = console.error;
  console.error = function () {
    show(Array.prototype.join.call(arguments, ' '));
    orig.apply(console, arguments);
  };
  document.addEventListener('DOMContentLoaded', function () { if (errs.length) show(errs.pop()); });
  // The laid-out page height, for a full-page screenshot (check_in_browser with height None).
  window.addEventListener('load', function () {
    document.documentElement.setAttribute('data-massact-height',
                                          String(document.documentElement.scrollHeight));
  });
})();
</script>
"""

_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
main { max-width: 1320px; margin: 0 auto; padding: 16px 28px 60px; }
h1 { font-size: 26px; margin: 18px 0 4px; }
h2 { font-size: 21px; margin: 36px 0 8px; padding-top: 10px; border-top: 2px solid #ddd; }
h3 { font-size: 16px; margin: 22px 0 6px; color: #333; }
p.lead { color: #555; margin: 2px 0 14px; }
.figure { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: 10px 0 18px;
          padding: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; background: #fff; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
details { margin: 8px 0 14px; }
details summary { cursor: pointer; color: #444; }
pre { background: #fff; border: 1px solid #e3e3e3; padding: 8px; font-size: 12px;
      overflow-x: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; margin: 8px 0 16px; }
.gallery figure { margin: 0; background: #fff; border: 1px solid #e3e3e3; padding: 6px; }
.gallery img { display: block; width: 192px; height: auto; image-rendering: pixelated; }
.gallery figcaption { font-size: 12px; color: #444; max-width: 192px; margin-top: 4px;
                      word-wrap: break-word; }
nav ul { margin: 4px 0 8px 18px; padding: 0; }
#massact-js-errors { display: none; background: #b00020; color: #fff; padding: 10px 16px;
                     white-space: pre-wrap; font-family: monospace; }
"""


def page(title: str, body: Sequence[str]) -> str:
    """A complete HTML document with plotly.js inlined once in the head."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        _ERROR_CATCHER,
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
        "</head><body>",
        '<div id="massact-js-errors"></div>',
        "<main>",
        *body,
        "</main></body></html>",
    ])


def figure(fig: go.Figure) -> str:
    """A figure as a ``<div>`` plus the script that draws it (no plotly.js: see :func:`page`)."""
    inner = pio.to_html(
        fig, full_html=False, include_plotlyjs=False,
        config={"displaylogo": False, "responsive": True},
    )
    return f'<div class="figure">{inner}</div>'


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (numbers right-aligned and shortened, lists joined)."""
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(columns) if columns is not None else list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, bool) or v is None:
                cells.append(f"<td>{html.escape(str(v) if v is not None else '–')}</td>")
            elif isinstance(v, (int, float)):
                cells.append(f'<td class="num">{html.escape(_cell(v))}</td>')
            elif isinstance(v, (list, tuple)):
                cells.append(f"<td>{html.escape(', '.join(_cell(x) for x in v))}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(v: object) -> str:
    return fmt(v) if isinstance(v, float) else str(v)


def metrics_tables(metrics: dict) -> str:
    """Metrics as readable tables instead of one long list of dotted keys.

    - dicts of scalars that share keys (``iou`` and ``foreground_fraction`` per channel set;
      ``to_source`` and ``to_target`` inside/outside) are pivoted into one table: rows are the
      keys, columns the metrics (blank where a metric lacks a key);
    - a dict of lists of flat records (the judge's readings of source, target and result) is a
      table with one row per record;
    - everything else (scalars, per-image lists) goes into a final metric/value table.
    """
    scalars: dict = {}
    groups: list[tuple[list[str], list[str]]] = []  # (row keys, metric names)
    flat_parts: dict[str, dict] = {}
    records: list[str] = []
    for k, v in metrics.items():
        if not isinstance(v, dict):
            scalars[k] = v
            continue
        if v and all(_is_records(x) for x in v.values()):
            records.append(_records_table(k, v))
            continue
        flat_parts[k] = {kk: vv for kk, vv in v.items() if not isinstance(vv, (dict, list))}
        if flat_parts[k]:
            keys = list(flat_parts[k])
            for rows, names in groups:
                if set(rows) & set(keys):
                    rows += [x for x in keys if x not in rows]
                    names.append(k)
                    break
            else:
                groups.append((keys, [k]))
        rest = {kk: vv for kk, vv in v.items() if kk not in flat_parts[k]}
        scalars.update({f"{k}.{kk}": vv for kk, vv in _flatten(rest).items()})
    merged: list[tuple[list[str], list[str]]] = []
    for rows, names in groups:  # a later metric may bridge two groups (kept: bg, already: all)
        for m_rows, m_names in merged:
            if set(rows) & set(m_rows):
                m_rows += [x for x in rows if x not in m_rows]
                m_names += names
                break
        else:
            merged.append((rows, names))
    out = []
    for rows, names in merged:
        out.append(table([{"": r, **{n: flat_parts[n].get(r) for n in names}} for r in rows],
                         ["", *names]))
    out += records
    if scalars:
        out.append(table([{"metric": k, "value": v} for k, v in scalars.items()], ["metric", "value"]))
    return "".join(out)


def _is_records(x: object) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(r, dict) and not any(isinstance(v, (dict, list)) for v in r.values()) for r in x)


def _records_table(name: str, groups: dict) -> str:
    rows = []
    for key, recs in groups.items():
        for i, r in enumerate(recs):
            rows.append({name: key if len(recs) == 1 else f"{key} [{i}]", **r})
    cols = [name] + list(dict.fromkeys(c for r in rows for c in r if c != name))
    return table(rows, cols)


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def gallery(images: Sequence[tuple[str, object]]) -> str:
    """Images inline as base64 PNG with captions; ``images``: ``[(caption, path|bytes|array)]``."""
    items = [
        f'<figure><img alt="{html.escape(cap)}" src="{png_data_uri(src)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, src in images
    ]
    return f'<div class="gallery">{"".join(items)}</div>'


def metadata(meta: dict, summary_keys: Sequence[str] = ()) -> str:
    """A run's metadata: the main keys as a table, everything as collapsible JSON."""
    rows = [{"key": k, "value": _short(meta[k])} for k in summary_keys if k in meta]
    full = html.escape(json.dumps(meta, indent=2, default=str))
    return (table(rows, ["key", "value"]) if rows else "") + (
        f"<details><summary>all metadata (JSON)</summary><pre>{full}</pre></details>"
    )


def _short(v: object) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
        return compact_ints(list(v))
    if isinstance(v, (list, tuple)):
        s = "; ".join(str(x) for x in v)
        return s if len(s) < 400 else s[:400] + f" … ({len(v)} items)"
    return str(v)


def heading(level: int, text: str, anchor: str | None = None) -> str:
    """``<hN>`` with an optional id for the table of contents."""
    a = f' id="{html.escape(anchor)}"' if anchor else ""
    return f"<h{level}{a}>{html.escape(text)}</h{level}>"


def paragraph(text: str) -> str:
    """A short explanatory paragraph (escaped)."""
    return f'<p class="lead">{html.escape(text)}</p>'
