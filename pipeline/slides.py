"""Whole-slide images through OpenSlide (SVS, NDPI, MRXS, SCN, …), read at the model's resolution.

The pyramid level is the coarsest one whose pixel size is no coarser than the model card's
resolution (20 % tolerance); tiles are cut and segmented at that level and polygons are mapped
back to level-0 pixels by the level's downsample, so outputs are always in level-0 pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from affine import Affine

from pipeline.grid import Span
from pipeline.sources import SourceError

TOLERANCE = 1.2


def is_slide(path: str | Path) -> bool:
    """Whether OpenSlide recognises a vendor slide format (plain TIFFs go through rasterio)."""
    try:
        return openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-tiff")
    except openslide.OpenSlideError:
        return False


def choose_level(level_mpp: list[float], target_mpp: float | None) -> int:
    """The coarsest level not coarser than ``target_mpp`` × 1.2 (level 0 when none is)."""
    if target_mpp is None:
        return 0
    fitting = [k for k, mpp in enumerate(level_mpp) if mpp <= target_mpp * TOLERANCE]
    return max(fitting) if fitting else 0


@dataclass(frozen=True)
class SlideSource:
    """A slide read at pyramid ``level``; ``height``/``width`` are that level's size."""

    path: str
    height: int
    width: int
    level: int
    downsample: float
    mpp: float | None
    level0_size: tuple[int, int] = (0, 0)
    bands: tuple[int, ...] = (1, 2, 3)
    crs_wkt: str | None = None

    @property
    def image_id(self) -> str:
        return Path(self.path).stem

    @property
    def transform(self) -> Affine:
        """Level pixels → level-0 pixels (per-axis ratio of the level sizes, so edges match)."""
        width0, height0 = self.level0_size
        return Affine.scale(width0 / self.width, height0 / self.height)

    @property
    def pixel_scale(self) -> float:
        """Level-0 pixels per level pixel along a side (geometric mean of the two axes)."""
        return float(np.sqrt(abs(self.transform.determinant)))

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, np.ndarray, float]:
        """(RGB thumbnail, valid mask, processed pixels per thumbnail pixel), read once."""
        with openslide.OpenSlide(self.path) as slide:
            rgba = np.asarray(slide.get_thumbnail((max_size, max_size)).convert("RGBA"))
        return rgba[..., :3], rgba[..., 3] > 0, self.width / rgba.shape[1]

    def read(self, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 RGB (h, w, 3), valid mask) of a window given in level pixels."""
        try:
            with openslide.OpenSlide(self.path) as slide:
                region = slide.read_region(
                    (round(cols.start * self.downsample), round(rows.start * self.downsample)),
                    self.level, (cols.length, rows.length),
                )
        except openslide.OpenSlideError as err:
            raise SourceError(f"{self.path}: read failed at level {self.level}, rows {rows.start}:{rows.stop} ({err})") from err
        rgba = np.asarray(region)
        valid = rgba[..., 3] > 0
        pixels = np.ascontiguousarray(rgba[..., :3])
        pixels[~valid] = 0
        return pixels, valid


def open_slide(path: str | Path, target_mpp: float | None = None, mpp: float | None = None) -> SlideSource:
    """Open a slide; ``mpp`` overrides (or supplies) its level-0 microns per pixel."""
    path = Path(path)
    try:
        with openslide.OpenSlide(str(path)) as slide:
            found = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
            level0 = mpp if mpp is not None else (float(found) if found else None)
            if level0 is None and target_mpp is not None:
                raise SourceError(f"{path}: no resolution metadata (microns per pixel); pass --mpp")
            downsamples = list(slide.level_downsamples)
            level = choose_level([level0 * d for d in downsamples] if level0 else downsamples, target_mpp)
            width, height = slide.level_dimensions[level]
            level0_size = slide.level_dimensions[0]
    except openslide.OpenSlideError as err:
        raise SourceError(f"{path}: not a readable slide ({err})") from err
    return SlideSource(str(path.resolve()), height, width, level, float(downsamples[level]), level0, level0_size)
