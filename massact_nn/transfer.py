"""Moving many small tensors between host and device in one copy.

On a GPU every copy between host and device waits for the queued work (a copy from ordinary host
memory too). Results and id sets come as dozens of small tensors, one or more per site: moved one
by one, each pays that wait.
"""

from __future__ import annotations

from typing import Any

import torch


def move_packed(tensors: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """The tensors on ``device``, moved in one copy whatever their dtypes.

    Their bytes travel as one uint8 buffer, widest dtypes first so that every part stays aligned;
    tensors already on ``device`` are returned as they are. The moved tensors are views of that
    buffer (contiguous, sharing its storage).

    Shapes:
        Any; each tensor keeps its shape and dtype.
    """
    device = torch.device(device)
    out = {k: t for k, t in tensors.items() if t.device == device}
    keys = sorted((k for k in tensors if k not in out), key=lambda k: -tensors[k].element_size())
    if keys:
        parts = [tensors[k].detach().contiguous().view(-1).view(torch.uint8) for k in keys]
        flat = torch.cat(parts).to(device)
        sizes = [p.numel() for p in parts]
        for k, part in zip(keys, flat.split(sizes)):
            out[k] = part.view(tensors[k].dtype).view(tensors[k].shape)
    return {k: out[k] for k in tensors}
