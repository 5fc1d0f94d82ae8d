"""Disruption of chosen channels (zero / mean / scale) and its result type. Pure tensor math."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, load_tensors, save_run
from .errors import MassactError, check_channel_ids, choice_error

MODES = ("zero", "mean", "token_mean", "scale")
"""``zero``: set to 0. ``mean``: set to the channel's dataset mean from the statistics run (its
signed ``mean``; runs written before that statistic existed only have the magnitude ``abs_mean``,
and then each sample's own token-mean sign is used, which for massive channels is the same in
every sample).
``token_mean``: set to the sample's own mean over image tokens at that step (removes the spatial
pattern, keeps the magnitude). ``scale``: multiply by ``alpha``."""


def ablate(
    h: torch.Tensor,
    channels: torch.Tensor,
    mode: str = "zero",
    alpha: float = 0.0,
    values: torch.Tensor | None = None,
    signed: bool = True,
    checked: bool = False,
) -> torch.Tensor:
    """A new tensor with ``channels`` of every image token replaced by the chosen mode.

    Channels are indexed with one tensor (no per-channel loop) and the input is never edited in
    place (nnsight invokes and Flux single blocks hand out views and copies). Ids on the CPU are
    range-checked here; ids already on the model's device are taken as checked (see
    :func:`check_channel_ids`), since reading them back would stall the GPU at every call.

    Args:
        h: Image-stream tokens.
        channels: Channel ids to disrupt (may be empty: returns ``h`` unchanged).
        mode: One of :data:`MODES`.
        alpha: Factor of ``scale`` mode.
        values: ``mean`` mode's value per chosen channel (a statistics run's ``mean``).
        signed: Whether ``values`` are signed means (written as they are) or magnitudes
            (``abs_mean``: each row then takes the sign of its own mean over tokens).
        checked: The ids were range-checked already (a caller editing every site and step
            checks them once): nothing is read from them here.

    Shapes:
        h: [rows, tokens, channels]; channels: [k]; values: [k] or [rows, k] -> [rows, tokens, channels].
    """
    if mode not in MODES:
        raise choice_error("disruption mode", mode, MODES)
    if h.ndim != 3:
        raise MassactError(f"expected image tokens [rows, tokens, channels], got {tuple(h.shape)}")
    if not isinstance(channels, torch.Tensor):
        channels = torch.as_tensor(channels)  # a list or an array of ids
    if channels.numel() == 0:
        return h
    if not checked and channels.device.type == "cpu":  # where it costs no device-to-host sync
        check_channel_ids(channels, h.shape[-1])
    ch = channels.to(h.device).long()
    if mode == "zero":
        return h.clone().index_fill_(-1, ch, 0)
    sel = h.index_select(-1, ch)  # [rows, tokens, k]
    if mode == "scale":
        new = sel * alpha
    elif mode == "token_mean":
        new = sel.mean(1, keepdim=True).expand_as(sel)
    else:
        if values is None:
            raise MassactError("mode 'mean' needs per-channel values (from a statistics run)")
        v = values.to(h.device, h.dtype)
        v = v.view(1, 1, -1) if v.ndim == 1 else v[:, None, :]
        if signed:
            new = v.expand_as(sel)
        else:
            sign = torch.where(sel.mean(1, keepdim=True) < 0, -1.0, 1.0).to(h.dtype)
            new = (sign * v.abs()).expand_as(sel)
    out = h.clone()
    out[..., ch] = new.to(h.dtype)
    return out


@dataclass
class DisruptionResult:
    """Images and metrics of one disruption experiment over several channel sets.

    Attributes:
        images: Per set name (``none`` = undisturbed baseline, ``top_k4``, ``low_k4``,
            ``random0_k4``, ...), the generated images. Shapes: [prompts, 3, H, W] in [0, 1].
        channels: Per set name, per site module path, the disrupted channel ids. Shapes: [k].
        metrics: ``{"sets": {name: {control, k, draw, mse, psnr, non_finite, per_image, judge?,
            user?}}, "summary": [one row per (control, k), random draws averaged]}``. A PSNR of
            ``None`` is infinite (identical images); NaN marks a value that is not finite because
            ``non_finite`` images are not.
        meta: Model, versions, prompts, seeds, steps, sites, mode, alpha, stats folder.
    """

    images: dict[str, torch.Tensor]
    channels: dict[str, dict[str, torch.Tensor]]
    metrics: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def sets(self) -> list[str]:
        """Set names in the order they were run."""
        return list(self.images)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors (``images/<set>``, ``channels/<set>/<module>``)."""
        t = {f"images/{s}": x for s, x in self.images.items()}
        for s, per_site in self.channels.items():
            for module, ch in per_site.items():
                t[f"channels/{s}/{module}"] = ch.long()
        return t

    def save(self, folder: str | Path) -> Path:
        """Write ``result.safetensors``, ``metrics.json`` and ``meta.json`` (atomically).

        safetensors keeps no key order: ``meta.json`` records the sets' (``set_order``) and each
        set's sites' (``site_order``), so :meth:`load` gives both back in execution order.
        """
        meta = {**self.meta, "kind": "disruption", "set_order": self.sets,
                "site_order": {s: list(per_site) for s, per_site in self.channels.items()}}
        return save_run(folder, self.tensors(), self.metrics, meta)

    @classmethod
    def load(cls, folder: str | Path) -> DisruptionResult:
        """Read a run folder written by :meth:`save`."""
        folder = Path(folder)
        meta = _read_meta(folder, "disruption")
        t = load_tensors(folder / "result.safetensors")
        order = meta.pop("set_order")
        site_order = meta.pop("site_order", None)
        missing = [s for s in order if f"images/{s}" not in t]
        if missing:
            have = [k.split("/", 1)[1] for k in t if k.startswith("images/")]
            raise MassactError(f"{str(folder)!r}: result.safetensors has no images of set {missing[0]!r} "
                               f"listed in meta.json; accepted: one of {', '.join(have) or 'none'}")
        images = {s: t[f"images/{s}"] for s in order}
        stored: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in t.items():
            if key.startswith("channels/"):
                _, s, module = key.split("/", 2)
                stored.setdefault(s, {})[module] = v
        if site_order is None:  # written before the order was recorded: the run's site order
            sites = list(meta.get("sites") or [])
            rank = lambda m: sites.index(m) if m in sites else len(sites)  # noqa: E731
            site_order = {s: sorted(stored.get(s, {}), key=rank) for s in [*order, *stored]}
        if not isinstance(site_order, dict) or not all(isinstance(m, list) for m in site_order.values()):
            raise MassactError(f"{str(folder)!r}: meta.json's site_order is {site_order!r}; accepted: "
                               "{set: [module paths]}")
        names = [*site_order, *(s for s in stored if s not in site_order)]
        channels = {s: _in_order(stored.get(s, {}), site_order.get(s, []), folder, s) for s in names}
        meta.pop("kind", None)
        return cls(images=images, channels=channels, metrics=load_json(folder / "metrics.json"), meta=meta)


def _in_order(per_site: dict[str, torch.Tensor], modules: list, folder: Path, name: str) -> dict:
    """``per_site`` with its sites in the recorded order (any not recorded follow, as stored)."""
    missing = [m for m in modules if m not in per_site]
    if missing:
        raise MassactError(f"{str(folder)!r}: result.safetensors has no channels of set {name!r} at "
                           f"site {missing[0]!r} listed in meta.json; accepted: one of "
                           f"{', '.join(per_site) or 'none'}")
    return {m: per_site[m] for m in [*modules, *(m for m in per_site if m not in modules)]}


def _read_meta(folder: Path, kind: str) -> dict:
    for name in ("meta.json", "metrics.json", "result.safetensors"):
        if not (folder / name).is_file():
            raise MassactError(f"no {kind} result in {str(folder)!r} (missing {name})")
    meta = load_json(folder / "meta.json")
    if meta.get("kind") != kind:
        raise MassactError(f"{str(folder)!r} holds a {meta.get('kind')!r} result; expected {kind!r}")
    return meta
