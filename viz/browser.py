"""Open a report in headless Chromium: JavaScript errors, figures drawn, and a screenshot.

Used by the tests (and handy by hand) to check a report the way a person sees it. Needs a
``chromium`` (or ``chromium-browser`` / ``google-chrome``) executable on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from massact_nn.errors import MassactError

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--mute-audio")
# Console messages Chromium logs at --v=0: `... CONSOLE(12)] "Uncaught TypeError: ...", source: ...`
_CONSOLE = re.compile(r'CONSOLE(?:\(\d+\))?\]?\s*"?(.*)')


def find_chromium() -> str | None:
    """Path of a headless-capable Chromium, or ``None``."""
    for name in _BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class BrowserCheck:
    """What headless Chromium saw.

    Attributes:
        errors: JavaScript errors (uncaught exceptions, console errors) from the page's own
            error catcher and from Chromium's console log.
        figures: Plotly figure ``<div>`` s in the page.
        drawn: Those that contain a drawn ``svg.main-svg``.
        screenshot: The PNG written, if one was asked for.
    """

    errors: list[str] = field(default_factory=list)
    figures: int = 0
    drawn: int = 0
    screenshot: Path | None = None


def check_in_browser(
    html_file: str | Path,
    screenshot: str | Path | None = None,
    window: tuple[int, int | None] = (1400, 4000),
    budget_ms: int = 10000,
    timeout_s: float = 120.0,
) -> BrowserCheck:
    """Load ``html_file`` in headless Chromium; collect errors, count drawn figures, screenshot.

    Args:
        window: Width and height of the screenshot in pixels. Height ``None``: the whole page,
            as laid out at that width (the library's reports record it; other pages get 4,000).

    Raises:
        MassactError: when no Chromium is installed.
    """
    exe = find_chromium()
    if exe is None:
        raise MassactError(
            "no chromium found on PATH; accepted: chromium, chromium-browser, google-chrome"
        )
    url = Path(html_file).resolve().as_uri()
    result = BrowserCheck()
    with tempfile.TemporaryDirectory(prefix="massact-chromium-") as profile:
        base = [exe, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                "--enable-logging=stderr", "--v=0"]
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True,
                             timeout=timeout_s)
        if dom.returncode != 0 and not dom.stdout:
            tail = dom.stderr.strip()[-500:]
            raise MassactError(f"chromium failed (exit {dom.returncode}): {tail}")
        result.errors += _console_errors(dom.stderr)
        result.errors += _page_errors(dom.stdout)
        result.figures, result.drawn = _count_figures(dom.stdout)
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            height = window[1] if window[1] is not None else _page_height(dom.stdout)
            run = subprocess.run(
                base + [f"--screenshot={shot}", f"--window-size={window[0]},{height}", url],
                capture_output=True, text=True, timeout=timeout_s,
            )
            result.errors += _console_errors(run.stderr)
            if shot.is_file():
                result.screenshot = shot
    result.errors = list(dict.fromkeys(result.errors))
    return result


def _page_height(dom: str, default: int = 4000, cap: int = 60000) -> int:
    # Measured at --dump-dom's default width; the screenshot's width may wrap text differently,
    # so a margin keeps the page's end in the picture.
    m = re.search(r'data-massact-height="(\d+)"', dom)
    return min(int(m.group(1)) + 200, cap) if m else default


def _console_errors(stderr: str) -> list[str]:
    out = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and ("Uncaught" in line or "Error" in line or ":ERROR:" in line):
            m = _CONSOLE.search(line)
            out.append((m.group(1) if m else line).strip())
        elif "Uncaught" in line:
            out.append(line.strip())
    return out


def _page_errors(dom: str) -> list[str]:
    m = re.search(r'<div id="massact-js-errors"[^>]*>(.*?)</div>', dom, re.S)
    if not m or not m.group(1).strip():
        return []
    return [ln for ln in m.group(1).strip().splitlines() if ln.strip()]


def _count_figures(dom: str) -> tuple[int, int]:
    # Each figure is a <div class="plotly-graph-div ..."> that plotly fills with its SVG layers.
    starts = [m.start() for m in re.finditer(r'<div[^>]*class="[^"]*plotly-graph-div', dom)]
    drawn = 0
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(dom)
        if re.search(r'<svg[^>]*class="main-svg"', dom[s:end]):
            drawn += 1
    return len(starts), drawn
