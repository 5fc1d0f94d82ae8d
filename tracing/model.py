"""Loading a diffusers pipeline as an nnsight ``DiffusionModel``, offline-first."""

from __future__ import annotations

import functools
import json
import re
import weakref
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from nnsight.modeling.diffusion import DiffusionModel

import massact_nn
from massact_nn.errors import MassactError, choice_error

from .adapters import Adapter, adapter_for, adapter_for_class, transformer_class_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def toy_path() -> Path:
    """Folder of the embedded default model shipped with the package (``--model toy``)."""
    return Path(massact_nn.__file__).parent / "assets" / "toy"


def resolve_model(spec: str | Path) -> str:
    """Turn ``--model`` into something ``from_pretrained`` takes.

    ``toy`` is the embedded default; an existing folder must hold a ``model_index.json``; an
    ``org/name`` string is a Hub id (used only when the network is there).

    Raises:
        MassactError: for a missing folder, a folder that is not a pipeline, or a missing toy.
    """
    s = str(spec)
    if s == "toy":
        p = toy_path()
        if not (p / "model_index.json").is_file():
            raise MassactError(
                f"the embedded default model is not available yet (no pipeline in {p}); "
                "train and export it with `massact toy train` / `massact toy export`"
            )
        return str(p)
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file() and not (p / "transformer" / "config.json").is_file():
            raise MassactError(
                f"model folder {s!r} holds no diffusers pipeline (no model_index.json); "
                "accepted: a diffusers pipeline folder, a Hub id, or 'toy'"
            )
        return str(p)
    if _HUB_ID.match(s) and not s.startswith((".", "/")):
        return s
    raise MassactError(
        f"model folder {s!r} does not exist; accepted: a diffusers pipeline folder, "
        "a Hub id like 'black-forest-labs/FLUX.1-schnell', or 'toy'"
    )


def hub_error(spec: str, e: Exception) -> MassactError:
    """The one-line error for a ``--model`` that is no local folder and cannot be fetched."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(first) > 200:  # at a word, not mid-word
        first = first[:200].rsplit(" ", 1)[0] + " ..."
    return MassactError(
        f"model {spec!r} is not a local folder, and as a Hub id it cannot be loaded ({first}); "
        "accepted: a diffusers pipeline folder (check the path), a Hub id in the local cache or "
        "reachable online, or 'toy'"
    )


def parse_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` to a torch dtype."""
    if name not in DTYPES:
        raise choice_error("dtype", name, DTYPES)
    return DTYPES[name]


def check_device(device: str | torch.device) -> torch.device:
    """The device, checked to exist and be usable here.

    Raises:
        MassactError: naming the device and the ones this machine has.
    """
    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MassactError(f"device={device!r} is not a device; accepted: {', '.join(here)}") from None
    if dev.type == "cpu" or (dev.type == "cuda" and str(dev) in here):
        return dev
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cuda" and callable(available) and available():  # mps, xpu, ...
        return dev
    raise MassactError(f"device={device!r} is not available here; accepted: {', '.join(here)}")


def load_model(
    spec: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> DiffusionModel:
    """Load a pipeline as an nnsight ``DiffusionModel`` with real weights on ``device``.

    Args:
        spec: ``toy``, a pipeline folder, or a Hub id.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: Weights dtype (statistics are float32 regardless).
    """
    path = resolve_model(spec)
    check_device(device)
    td = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    _check_transformer_class(path)
    try:
        model = DiffusionModel(path, dispatch=True, dtype=td)
    except OSError as e:  # the Hub's and the offline cache's errors are OSErrors too
        if Path(path).exists():
            raise
        raise hub_error(str(spec), e) from None
    model.pipeline.to(device)
    model.pipeline.set_progress_bar_config(disable=True)
    adapter_for(model.pipeline.transformer)
    return model


def _check_transformer_class(path: str) -> None:
    # Fail before loading weights: an unsupported class should cost nothing.
    cfg = Path(path) / "transformer" / "config.json"
    if cfg.is_file():
        adapter_for_class(transformer_class_name(json.loads(cfg.read_text())))


def model_adapter(model: Any) -> Adapter:
    """The adapter of an nnsight ``DiffusionModel`` (or a diffusers pipeline)."""
    pipe = getattr(model, "pipeline", model)
    tr = getattr(pipe, "transformer", None)
    if tr is None:
        raise MassactError(f"{type(pipe).__name__} has no `transformer`; only DiT pipelines are supported")
    return adapter_for(tr)


def model_name(model: Any) -> str:
    """A stable name for run metadata: the folder or Hub id the pipeline came from."""
    pipe = getattr(model, "pipeline", model)
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    if name and _is_toy(str(name)):
        return "toy"
    return str(name or type(pipe).__name__)


@functools.lru_cache(maxsize=64)
def _is_toy(name: str) -> bool:
    # Resolving paths makes system calls (~40 µs): once per name, not at every run's end.
    return Path(name).resolve() == toy_path().resolve()


def transformer_device(model: Any) -> torch.device:
    """The device the transformer computes on: diffusers' ``transformer.device``, at less cost.

    diffusers' property walks every submodule through ``nn.Module.__getattr__`` at each read,
    looking for a group-offloading hook: 2.3 ms on FLUX.1-dev's 1,279 modules, before the first
    transformer call, where a GPU has nothing to run. Here the walk reads each module's own
    ``__dict__`` (0.5 ms there): with no diffusers hook anywhere the answer is the first
    parameter's device, with any hook (group offloading puts its hooks on submodules only at
    ``leaf_level``; caching hooks) diffusers answers.

    A walk that found no hook while the first parameter sat on an accelerator is remembered for
    that transformer, and the next call only reads the first parameter's device (a third of a
    millisecond of idle GPU per run on a six-block model). Applying group offloading moves the
    parameters to the offload device at once (diffusers' hook initialisation), so a changed
    device means another walk; CPU parameters are always walked (that is where a model sits
    when offloading is applied before it was ever moved).
    """
    pipe = getattr(model, "pipeline", model)
    tr = pipe.transformer
    first = next(tr.parameters(), None)
    if first is not None and first.device.type != "cpu" and _no_hooks_on.get(tr) == first.device:
        return first.device
    _no_hooks_on.pop(tr, None)
    if first is not None and not _has_diffusers_hooks(tr):
        if first.device.type != "cpu":
            _no_hooks_on[tr] = first.device
        return first.device
    return tr.device


# Transformer -> the accelerator its parameters were on when a walk found no diffusers hook.
_no_hooks_on: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_diffusers_hooks(module: torch.nn.Module) -> bool:
    stack = [module]
    while stack:
        d = vars(stack.pop())
        registry = d.get("_diffusers_hook")
        # A pipeline call leaves an empty registry behind; a registry diffusers changed counts.
        if registry is not None and getattr(registry, "hooks", None) != {}:
            return True
        stack.extend(m for m in d.get("_modules", {}).values() if m is not None)
    return False


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for run metadata."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    # Reading package metadata parses files (~8 ms): once per process, not once per run.
    out = {}
    for pkg in ("massact-nn", "torch", "nnsight", "diffusers", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
