"""Synthetic scenes with known instances: textured backgrounds and shapes of several sizes.

Used to train the shipped demo model and, written as GeoTIFFs by the tests, to check the seam
merge against exact ground truth. Pure NumPy; every scene is a function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("ellipse", "rectangle", "triangle")


@dataclass
class Scene:
    """An RGB image, its instance label image (0 = background) and each instance's class index."""

    image: np.ndarray
    labels: np.ndarray
    classes: np.ndarray

    @property
    def count(self) -> int:
        return len(self.classes)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    coarse = rng.random((height // cell + 2, width // cell + 2))
    rows = np.linspace(0, coarse.shape[0] - 1.001, height)
    cols = np.linspace(0, coarse.shape[1] - 1.001, width)
    r0, c0 = rows.astype(int), cols.astype(int)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float RGB in [0, 1]: a colour field with blotches at two scales and pixel noise."""
    base = rng.uniform(0.25, 0.75, size=3)
    image = np.empty((height, width, 3), np.float32)
    large = _smooth_noise(rng, height, width, 97)
    small = _smooth_noise(rng, height, width, 11)
    for band in range(3):
        image[..., band] = base[band] + 0.18 * (large - 0.5) * rng.uniform(0.5, 1.5) + 0.08 * (small - 0.5)
    image += rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    return image


def shape_mask(kind: str, size: float, aspect: float, angle: float) -> np.ndarray:
    """A boolean mask of one shape, tightly cropped; ``size`` is its long side in pixels."""
    half = int(np.ceil(size / 2)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = xx * cos + yy * sin, -xx * sin + yy * cos
    a, b = size / 2, size * aspect / 2
    if kind == "ellipse":
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    elif kind == "rectangle":
        mask = (np.abs(u) <= a) & (np.abs(v) <= b)
    else:
        corners = [(-a, b), (a, b), (0.0, -b)]
        mask = np.ones_like(u, bool)
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
            mask &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) <= 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def make_scene(
    seed: int,
    height: int,
    width: int,
    density: float = 1.0,
    size_range: tuple[float, float] = (10.0, 150.0),
    gap: int = 3,
    margin: int = 0,
) -> Scene:
    """A scene whose objects never touch: sizes log-uniform in ``size_range``.

    ``density`` scales the number of placement attempts (1.0 ≈ one object per 110² pixels);
    objects keep ``margin`` pixels from the image edge.
    """
    rng = np.random.default_rng(seed)
    image = textured_background(rng, height, width)
    labels = np.zeros((height, width), np.int32)
    classes: list[int] = []
    attempts = int(density * height * width / 110**2) + 1
    lo, hi = np.log(size_range[0]), np.log(size_range[1])
    for _ in range(attempts):
        kind = int(rng.integers(len(CLASSES)))
        size = float(np.exp(rng.uniform(lo, hi)))
        mask = shape_mask(CLASSES[kind], size, rng.uniform(0.45, 1.0), rng.uniform(0, np.pi))
        h, w = mask.shape
        if h >= height - 2 * margin or w >= width - 2 * margin:
            continue
        r, c = int(rng.integers(margin, height - h - margin)), int(rng.integers(margin, width - w - margin))
        r0, c0 = max(r - gap, 0), max(c - gap, 0)
        if labels[r0 : r + h + gap, c0 : c + w + gap].any():
            continue
        classes.append(kind)
        labels[r : r + h, c : c + w][mask] = len(classes)
        region = image[r : r + h, c : c + w]
        background = region[mask].mean(0)
        shift = rng.uniform(0.25, 0.45) * rng.choice([-1.0, 1.0], size=3)
        shift[rng.integers(3)] *= -1
        colour = np.clip(background + shift, 0.05, 0.95)
        texture = rng.normal(0, 0.04, size=(int(mask.sum()), 1))
        region[mask] = colour + texture
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return Scene(image=image, labels=labels, classes=np.asarray(classes, np.int16))
