"""A small CNN that reads the three caption attributes back from a world image.

It is trained on fresh world images (with noise and colour jitter, so that slightly
imperfect generated images are still read correctly) and ships beside the toy pipeline as
``judge.safetensors`` + ``judge.json``. It measures whether generated images match their
prompts: per-attribute accuracy and the fraction with all three right.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from massact_nn import world as W
from massact_nn._io import save_json, save_tensors

ATTRIBUTES = ("fg_colour", "shape", "bg_colour")
"""Attributes the judge predicts, in head order."""

_WEIGHTS, _META = "judge.safetensors", "judge.json"


class JudgeNet(nn.Module):
    """Three conv stages and one classification head per attribute.

    Args:
        width: channels of the first conv stage (doubled in the later ones).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        w2 = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(w2 * 16, 128), nn.ReLU(),
        )
        sizes = {
            "fg_colour": len(W.COLOURS),
            "shape": len(W.SHAPES),
            "bg_colour": len(W.BG_COLOURS),
        }
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in sizes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute.

        Shapes: images [B, 3, 32, 32] in [-1, 1] -> {attr: [B, n_classes]}.
        """
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pixel noise, per-image colour shift and occasional blur: generated images are imperfect."""
    b = x.shape[0]
    x = x + torch.rand(b, 1, 1, 1, generator=gen) * 0.15 * torch.randn(x.shape, generator=gen)
    x = x + 0.08 * torch.randn(b, 3, 1, 1, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        k = torch.ones(3, 1, 3, 3) / 9.0
        padded = nn.functional.pad(x[blur], (1, 1, 1, 1), mode="replicate")
        x[blur] = nn.functional.conv2d(padded, k, groups=3)
    return x.clamp(-1.0, 1.0)


def train_judge(
    steps: int = 2000, seconds: float | None = None, seed: int = 0, log: Any = print
) -> JudgeNet:
    """Train a judge on fresh world images (batch 64) for ``steps`` or ``seconds``.

    Counting steps rather than time keeps the judge's quality independent of how busy the
    machine is; ``seconds`` is an optional extra cap.
    """
    torch.manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    world, gen = W.World(seed + 100), torch.Generator().manual_seed(seed)
    start, step = time.time(), 0
    while step < steps and (seconds is None or time.time() - start < seconds):
        batch = world.sample(64)
        x = _augment(torch.from_numpy(batch.images), gen)
        logits = net(x)
        loss = sum(
            nn.functional.cross_entropy(logits[k], torch.from_numpy(batch.attributes[k]))
            for k in ATTRIBUTES
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"judge step {step} loss {loss.item():.4f}")
    return net.eval()


def save_judge(net: JudgeNet, folder: str | Path) -> None:
    """Write ``judge.safetensors`` and ``judge.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / _WEIGHTS, net.state_dict())
    meta = {
        "width": net.width,
        "attributes": list(ATTRIBUTES),
        "fg_colour": W.COLOURS,
        "shape": W.SHAPES,
        "bg_colour": W.BG_COLOURS,
        "input": "float32 [B, 3, 32, 32] in [-1, 1]",
    }
    save_json(folder / _META, meta)


def load_judge(folder: str | Path) -> JudgeNet:
    """Load a judge saved by :func:`save_judge`.

    Raises:
        FileNotFoundError: when the folder has no judge.
    """
    folder = Path(folder)
    if not (folder / _WEIGHTS).exists():
        raise FileNotFoundError(f"no {_WEIGHTS} in {folder}")
    meta = json.loads((folder / _META).read_text())
    net = JudgeNet(width=meta["width"])
    net.load_state_dict(load_file(folder / _WEIGHTS))
    return net.eval()


def to_world_images(images: Any) -> torch.Tensor:
    """Convert pipeline outputs to the world convention.

    Accepts a list of PIL images, a numpy array [B, H, W, 3] in [0, 1] (``output_type="np"``)
    or a tensor/array [B, 3, H, W] already in [-1, 1].

    Shapes: -> [B, 3, H, W] float32 in [-1, 1].
    """
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    return torch.as_tensor(images, dtype=torch.float32)


@torch.no_grad()
def judge(images: Any, net: JudgeNet) -> dict[str, np.ndarray]:
    """Predicted attribute indices.

    Args:
        images: anything :func:`to_world_images` accepts.
        net: a trained judge.

    Returns:
        ``{attr: int array [B]}`` for ``fg_colour``, ``shape``, ``bg_colour``.
    """
    logits = net(to_world_images(images))
    return {k: v.argmax(-1).numpy() for k, v in logits.items()}


def score(
    images: Any, targets: Sequence[str] | dict[str, np.ndarray], net: JudgeNet
) -> dict[str, float]:
    """Accuracy of the judge's reading against the intended attributes.

    Args:
        images: anything :func:`to_world_images` accepts.
        targets: one world caption per image, or ``{attr: int array [B]}``.
        net: a trained judge.

    Returns:
        Accuracy per attribute and ``all_three`` (all attributes right at once).
    """
    if not isinstance(targets, dict):
        parsed = [W.parse_caption(c) for c in targets]
        targets = {k: np.array([p[k] for p in parsed]) for k in ATTRIBUTES}
    pred = judge(images, net)
    hits = {k: pred[k] == np.asarray(targets[k]) for k in ATTRIBUTES}
    out = {k: float(v.mean()) for k, v in hits.items()}
    out["all_three"] = float(np.logical_and.reduce([hits[k] for k in ATTRIBUTES]).mean())
    return out
