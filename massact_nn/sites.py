"""Sites: the image-stream outputs of a DiT's blocks, named by their diffusers module path."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .errors import MassactError


@dataclass(frozen=True)
class Site:
    """One block's image-stream output.

    Attributes:
        layer: Flat index in execution order (0 = first block the model runs).
        module: Module path relative to the transformer, e.g. ``"single_transformer_blocks.10"``.
        channels: Width of the image stream at this site.
        streams: Streams the block outputs, e.g. ``("image", "text")`` or ``("image",)``.
        kind: The adapter's name for the block kind, e.g. ``"double"`` or ``"single"``.
    """

    layer: int
    module: str
    channels: int
    streams: tuple[str, ...] = ("image",)
    kind: str = "block"

    def to_json(self) -> dict:
        """Plain-JSON form (``streams`` as a list)."""
        d = asdict(self)
        d["streams"] = list(self.streams)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Site:
        """Inverse of :meth:`to_json`."""
        return cls(
            layer=int(d["layer"]), module=str(d["module"]), channels=int(d["channels"]),
            streams=tuple(d.get("streams", ("image",))), kind=str(d.get("kind", "block")),
        )


def _layers(sites: Sequence[Site]) -> str:
    """The layer indices a site list accepts: ``0..56``, or the list of a subset run's layers."""
    layers = sorted(s.layer for s in sites)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _not_a_site(w: object, sites: Sequence[Site]) -> MassactError:
    example = repr(sites[0].module) if sites else "..."
    return MassactError(f"site {w!r} is neither a module path nor a layer index; accepted: module "
                        f"paths (e.g. {example}) or layer indices {_layers(sites)}")


def resolve_sites(sites: Sequence[Site], wanted: Sequence[str | int] | str | int | None) -> list[Site]:
    """Pick sites by module path or flat layer index; ``None`` means all.

    Raises:
        MassactError: naming the unknown site and listing the accepted ones, or for an empty
            selection (an intervention at no site would silently change nothing).
    """
    if wanted is None:
        return list(sites)
    # One site by itself is a selection of one (a bare string would otherwise be its characters).
    try:
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    except TypeError:  # an int, a numpy or 0-d torch integer
        wanted = [wanted]
    if not wanted:
        raise MassactError("no sites selected (sites=[]); accepted: None for every site, or module "
                           "paths / layer indices")
    by_module = {s.module: s for s in sites}
    by_layer = {s.layer: s for s in sites}
    out: list[Site] = []
    for w in wanted:
        key: str | int
        if isinstance(w, str):
            key = w
        elif isinstance(w, bool):  # True is not layer 1
            raise _not_a_site(w, sites)
        else:
            try:
                key = operator.index(w)  # numpy and torch integers are layer indices too
            except TypeError:
                raise _not_a_site(w, sites) from None
        if isinstance(w, str) and w.lstrip("-").isdigit():
            key = int(w)
        site = by_layer.get(key) if isinstance(key, int) else by_module.get(key)
        if site is None:
            accepted = ", ".join(s.module for s in sites)
            raise MassactError(
                f"unknown site {w!r}; accepted: module paths ({accepted}) "
                f"or layer indices {_layers(sites)}"
            )
        if site not in out:
            out.append(site)
    return sorted(out, key=lambda s: s.layer)
