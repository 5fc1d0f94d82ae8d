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
from massact_nn.errors import MassactError

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


_ACCEPTED = (
    f"float [B, 3, {W.SIZE}, {W.SIZE}] in [-1, 1] (tensor or array), float numpy "
    f"[B, {W.SIZE}, {W.SIZE}, 3] in [0, 1] (output_type='np'), or a list of PIL images"
)


def _describe(images: Any) -> str:
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    return f"images given as {type(images).__name__} of shape {list(shape)}, dtype {dtype}"


def to_world_images(images: Any) -> torch.Tensor:
    """Convert pipeline outputs to the world convention, refusing what the judge cannot read.

    Accepts a list of PIL images, a float numpy array [B, H, W, 3] in [0, 1]
    (``output_type="np"``) or a float tensor/array [B, 3, H, W] already in [-1, 1], with
    H = W = 32 (the world's size). Integer images (uint8 0..255) are refused rather than
    rescaled: pass PIL images, or floats. The value range is not checked: an image in
    [0, 1] where [-1, 1] is expected cannot be told apart reliably from a dark one, and is
    misread silently, so convert with ``x * 2 - 1`` first.

    Shapes: -> [B, 3, H, W] float32 in [-1, 1].

    Raises:
        MassactError: naming the shape or dtype, for an integer or boolean input, an
            unbatched image, an image of another size, or no images at all.
    """
    if isinstance(images, Sequence) and not isinstance(images, (np.ndarray, str)):
        if not images:
            raise MassactError(f"cannot judge an empty list of images; accepted: {_ACCEPTED}")
        bad = [type(im).__name__ for im in images if not hasattr(im, "convert")]
        if bad:
            raise MassactError(f"a list of {bad[0]} is not a list of PIL images; accepted: "
                               f"{_ACCEPTED}")
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0
    else:
        if not isinstance(images, (np.ndarray, torch.Tensor)):
            raise MassactError(f"cannot judge images given as {type(images).__name__}; "
                               f"accepted: {_ACCEPTED}")
        floating = (
            images.is_floating_point()
            if isinstance(images, torch.Tensor)
            else np.issubdtype(images.dtype, np.floating)
        )
        if not floating:
            raise MassactError(f"cannot judge {_describe(images)}: not floating point (integer "
                               f"images such as uint8 0..255 are not rescaled); accepted: {_ACCEPTED}")
        if images.ndim != 4:
            raise MassactError(f"cannot judge {_describe(images)}: not a batch [B, 3, H, W] "
                               f"(add a batch dimension to a single image); accepted: {_ACCEPTED}")
        if isinstance(images, np.ndarray) and images.shape[-1] == 3 and images.shape[1] != 3:
            x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
        else:
            x = torch.as_tensor(images, dtype=torch.float32)
    if x.shape[0] == 0 or tuple(x.shape[1:]) != (3, W.SIZE, W.SIZE):
        read = "" if tuple(x.shape) == tuple(getattr(images, "shape", ())) else f" (read as {list(x.shape)})"
        raise MassactError(f"cannot judge {_describe(images)}{read}; accepted: {_ACCEPTED}")
    return x


@torch.no_grad()
def judge(images: Any, net: JudgeNet) -> dict[str, np.ndarray]:
    """Predicted attribute indices.

    Args:
        images: anything :func:`to_world_images` accepts (it names what that is, and the
            caveat about the value range).
        net: a trained judge.

    Returns:
        ``{attr: int array [B]}`` for ``fg_colour``, ``shape``, ``bg_colour``.

    Raises:
        MassactError: for images :func:`to_world_images` refuses.
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

    Raises:
        MassactError: for images :func:`to_world_images` refuses, or targets that do not
            give one value per image.
    """
    if not isinstance(targets, dict):
        parsed = [W.parse_caption(c) for c in targets]
        targets = {k: np.array([p[k] for p in parsed]) for k in ATTRIBUTES}
    missing = [k for k in ATTRIBUTES if k not in targets]
    if missing:
        raise MassactError(f"targets lack {', '.join(missing)}; accepted: one world caption per "
                           f"image, or a dict with {', '.join(ATTRIBUTES)}")
    pred = judge(images, net)
    n = len(pred[ATTRIBUTES[0]])
    sizes = {k: np.asarray(targets[k]).shape for k in ATTRIBUTES}
    if any(size != (n,) for size in sizes.values()):
        raise MassactError(f"{n} images but targets of shapes {sizes}; accepted: one target "
                           "(caption or attribute index) per image")
    hits = {k: pred[k] == np.asarray(targets[k]) for k in ATTRIBUTES}
    out = {k: float(v.mean()) for k, v in hits.items()}
    out["all_three"] = float(np.logical_and.reduce([hits[k] for k in ATTRIBUTES]).mean())
    return out
