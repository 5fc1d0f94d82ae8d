"""The layers stay visible: pure math never imports the hooking or plotting stacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pure_layer_imports_no_nnsight_diffusers_plotly():
    mods = sorted(
        "massact_nn." + p.stem for p in (ROOT / "massact_nn").glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('nnsight', 'diffusers', 'plotly', 'transformers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"massact_nn imported {out.stdout.strip()}"


def _imports(folder: Path, lib: str) -> list[str]:
    pat = re.compile(rf"^\s*(from|import)\s+{lib}\b", re.M)
    return [str(p.relative_to(ROOT)) for p in folder.rglob("*.py") if pat.search(p.read_text())]


def test_only_tracing_imports_nnsight_and_only_viz_imports_plotly():
    for folder in ("massact_nn", "viz"):
        assert _imports(ROOT / folder, "nnsight") == [], folder
    for lib in ("diffusers", "transformers"):  # lazy imports inside functions count too
        assert _imports(ROOT / "massact_nn", lib) == [], lib
    for folder in ("massact_nn", "tracing"):
        assert _imports(ROOT / folder, "plotly") == [], folder


def test_every_package_folder_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
