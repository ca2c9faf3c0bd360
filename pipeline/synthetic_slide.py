"""Generated whole-slide images: tissue islands on glass, written tile by tile as a pyramidal OME-TIFF.

Memory stays bounded by one tile and the islands, so slides of 100,000² pixels and more can be
made on a laptop; glass compresses to almost nothing. Islands are synthetic scenes with known
instances (``models.synthetic``), so runs on these slides can be checked against ground truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from models.synthetic import Scene, make_scene

GLASS = 242
TILE = 512


@dataclass
class Island:
    """A patch of tissue: a synthetic scene placed with its top-left corner at (row, col)."""

    row: int
    col: int
    scene: Scene


def _tiles(height: int, width: int, islands: list[Island], step: int) -> Iterator[np.ndarray]:
    """Row-major tiles of the level downsampled by ``step`` (islands strided, glass elsewhere)."""
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            tile = np.full((TILE, TILE, 3), GLASS, np.uint8)
            for island in islands:
                image = island.scene.image[::step, ::step]
                r0, c0 = island.row // step, island.col // step
                rows = slice(max(top, r0), min(top + TILE, r0 + image.shape[0]))
                cols = slice(max(left, c0), min(left + TILE, c0 + image.shape[1]))
                if rows.start < rows.stop and cols.start < cols.stop:
                    tile[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = image[
                        rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0
                    ]
            yield tile


def make_islands(height: int, width: int, count: int, island_size: int, seed: int = 0) -> list[Island]:
    """``count`` non-overlapping square islands at random places on a ``height`` × ``width`` slide."""
    rng = np.random.default_rng(seed)
    islands: list[Island] = []
    while len(islands) < count:
        row = int(rng.integers(0, height - island_size)) // 16 * 16
        col = int(rng.integers(0, width - island_size)) // 16 * 16
        if all(abs(row - i.row) >= island_size + 64 or abs(col - i.col) >= island_size + 64 for i in islands):
            islands.append(Island(row, col, make_scene(seed + len(islands), island_size, island_size)))
    return islands


def write_slide(path: str | Path, height: int, width: int, islands: list[Island], mpp: float = 0.25) -> Path:
    """Write an OME-TIFF pyramid (SubIFDs, halving down to ≤ 1024 px) with ``mpp`` µm pixels."""
    path = Path(path)
    levels = [1]
    while max(height, width) // (levels[-1] * 2) >= 1024 // 2 and len(levels) < 12:
        levels.append(levels[-1] * 2)
    options = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        for k, step in enumerate(levels):
            shape = (-(-height // step), -(-width // step), 3)
            extra = (
                dict(subifds=len(levels) - 1, metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
                if k == 0 else dict(subfiletype=1, metadata=None)
            )
            writer.write(_tiles(shape[0], shape[1], islands, step), shape=shape, **options, **extra)
    return path
