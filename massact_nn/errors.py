"""The library's error type: one clear line naming the bad value and what is accepted."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch


class MassactError(ValueError):
    """Bad input or a model that does not match what an adapter expects.

    The CLI prints the message as one line and exits non-zero; the Python API raises it.
    """


def choice_error(what: str, value: object, accepted: Iterable[object]) -> MassactError:
    """An error for a value that is not one of the accepted ones."""
    acc = ", ".join(str(a) for a in accepted)
    return MassactError(f"unknown {what} {value!r}; accepted: {acc}")


def check_k(k: int, channels: int, what: str = "k", pool: str = "the channel count") -> int:
    """Check that ``1 <= k <= channels`` and return ``k`` as an int (numpy/torch ints too).

    Args:
        pool: What ``channels`` counts, for the message.
    """
    try:
        if isinstance(k, bool):
            raise TypeError
        i = operator.index(k)
    except TypeError:
        raise MassactError(f"{what}={k!r} is not an integer; accepted: an integer 1..{channels} "
                           f"({pool})") from None
    if not 1 <= i <= channels:
        raise MassactError(f"{what}={k!r} is out of range; accepted: 1..{channels} ({pool})")
    return i


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 1``: numpy and torch integers too, never a bool or a float.

    Raises:
        MassactError: naming the value, for a non-integer or one below 1.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise MassactError(f"{name}={value!r} is not an integer; accepted: an integer >= 1") from None
    if i < 1:
        raise MassactError(f"{name}={value!r} is out of range; accepted: an integer >= 1")
    return i


def channel_ids(channels: Any, width: int, where: str = "") -> torch.Tensor:
    """Checked channel ids (a tensor, list or array) as a flat int64 tensor on their device.

    Raises:
        MassactError: as :func:`check_channel_ids`.

    Shapes:
        channels: any -> [k] int64.
    """
    ids = torch.as_tensor(channels).flatten()
    check_channel_ids(ids, width, where)
    return ids.long()


def check_channel_ids(channels: Any, width: int, where: str = "") -> None:
    """Raise unless every id is in ``0..width-1``.

    It reads the values: call it on ids on the CPU, once, not inside a loop over a GPU's calls.

    Shapes:
        channels: [k] (a tensor).
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(channels, torch.Tensor):
        channels = torch.as_tensor(channels)  # a list or an array of ids
    if channels.numel() and (channels.dtype == torch.bool or channels.is_floating_point()
                             or channels.is_complex()):
        # A boolean channel mask read as ids would edit channels 0 and 1; 5.9 would become 5.
        raise MassactError(f"{prefix}channel ids of dtype {channels.dtype}; accepted: integer ids "
                           "(for a boolean mask over channels: mask.nonzero().flatten())")
    if channels.numel() and (int(channels.max()) >= width or int(channels.min()) < 0):
        raise MassactError(f"{prefix}channel ids {channels.tolist()} out of range; accepted: 0..{width - 1}")
