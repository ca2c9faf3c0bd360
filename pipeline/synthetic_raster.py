"""Synthetic scenes written as georeferenced GeoTIFFs, for the demo, tests and benchmarks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from models.synthetic import Scene, make_scene

DEFAULT_CRS = "EPSG:32631"
DEFAULT_TRANSFORM = Affine(0.5, 0.0, 430000.0, 0.0, -0.5, 5420000.0)


def write_geotiff(
    image: np.ndarray,
    path: str | Path,
    crs: str | None = DEFAULT_CRS,
    transform: Affine = DEFAULT_TRANSFORM,
    nodata: float | None = None,
    blocksize: int = 256,
) -> Path:
    """Write an (h, w, bands) array as a tiled, compressed GeoTIFF."""
    path = Path(path)
    height, width, count = image.shape
    profile = dict(
        driver="GTiff", height=height, width=width, count=count, dtype=image.dtype.name,
        crs=crs, transform=transform, nodata=nodata, compress="deflate",
    )
    if height >= blocksize and width >= blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    with warnings.catch_warnings():
        if crs is None:  # pixel space asked for: GDAL's "not georeferenced" is the point
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(image.transpose(2, 0, 1))
    return path


def write_tiled_scene(path: str | Path, seed: int, side: int, block: int = 5000) -> int:
    """Write a ``side`` × ``side`` scene too large to hold in memory: one generated ``block`` ×
    ``block`` scene (objects kept 2 px from its edges, so copies never touch) repeated across the
    image, cut off at the right and bottom. Returns the number of whole objects in the image."""
    scene = make_scene(seed, block, block, margin=2)
    profile = dict(
        driver="GTiff", height=side, width=side, count=3, dtype="uint8", crs=DEFAULT_CRS,
        transform=DEFAULT_TRANSFORM, compress="deflate", tiled=True, blockxsize=256, blockysize=256,
        BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
    )
    count = 0
    with rasterio.open(path, "w", **profile) as dataset:
        for row in range(0, side, block):
            for col in range(0, side, block):
                h, w = min(block, side - row), min(block, side - col)
                dataset.write(scene.image[:h, :w].transpose(2, 0, 1), window=Window(col, row, w, h))
                cut = np.union1d(scene.labels[h:], scene.labels[:, w:])  # objects with a pixel off the image
                count += scene.count - np.count_nonzero(cut)
    return count


def write_scene(path: str | Path, seed: int, height: int, width: int, **scene_kwargs) -> Scene:
    """Generate a scene and write its image as a GeoTIFF; returns the scene (ground truth)."""
    scene = make_scene(seed, height, width, **scene_kwargs)
    write_geotiff(scene.image, path)
    return scene
