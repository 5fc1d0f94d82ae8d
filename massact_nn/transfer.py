"""Moving many small tensors between host and device in one copy.

On a GPU every copy between host and device waits for the queued work (a copy from ordinary host
memory too). Results and id sets come as dozens of small tensors, one or more per site: moved one
by one, each pays that wait.
"""

from __future__ import annotations

from typing import Any

import torch


def move_packed(tensors: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """The tensors on ``device``, detached, moved in one copy per source device whatever their dtypes.

    Their bytes travel as one uint8 buffer, widest dtypes first so that every part stays aligned.
    Tensors already on ``device`` are returned as they are: callers that need a copy make it.
    Moved tensors are views of that buffer (contiguous, sharing its storage). Quantized, sparse
    and nested tensors, whose bytes cannot be viewed, are moved one by one.

    Shapes:
        Any; each tensor keeps its shape and dtype.
    """
    # "cuda" and "cuda:0" name the same device; a tensor's device always carries the index.
    device = torch.empty(0, device=device).device
    out: dict[str, torch.Tensor] = {}
    packs: dict[torch.device, list[str]] = {}
    for k, t in tensors.items():
        if t.device == device:
            out[k] = t
        elif t.is_quantized or t.is_nested or t.layout != torch.strided:
            out[k] = t.detach().to(device)
        else:
            packs.setdefault(t.device, []).append(k)
    for keys in packs.values():
        keys.sort(key=lambda k: -tensors[k].element_size())
        parts = [tensors[k].detach().resolve_conj().resolve_neg().contiguous().view(-1).view(torch.uint8)
                 for k in keys]
        flat = torch.cat(parts).to(device)
        for k, part in zip(keys, flat.split([p.numel() for p in parts])):
            out[k] = part.view(tensors[k].dtype).view(tensors[k].shape)
    return {k: out[k] for k in tensors}
