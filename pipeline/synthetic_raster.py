"""Synthetic scenes written as georeferenced GeoTIFFs, for the demo, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

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
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(image.transpose(2, 0, 1))
    return path


def write_scene(path: str | Path, seed: int, height: int, width: int, **scene_kwargs) -> Scene:
    """Generate a scene and write its image as a GeoTIFF; returns the scene (ground truth)."""
    scene = make_scene(seed, height, width, **scene_kwargs)
    write_geotiff(scene.image, path)
    return scene
