"""Pictures of a result: instances over the image (whole, decimated, or a full-resolution region)
and a density heatmap. Matplotlib figures drawn on an Agg canvas (no pyplot, no display), so
previews can be made from any thread or worker.

Output coordinates are those of the outputs: the CRS for georeferenced rasters, level-0 pixels for
slides and unreferenced images. Views are read decimated (rasterio ``out_shape`` resampling, or the
slide pyramid level nearest the scale), never at full resolution when that exceeds ``max_size``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import matplotlib
import numpy as np
import shapely
from affine import Affine
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath
from matplotlib.ticker import MaxNLocator

from pipeline.grid import Span
from pipeline.sources import RasterSource, open_image, opened
from pipeline.writers import atomic_path

if TYPE_CHECKING:
    from pipeline.slides import SlideSource

DPI = 64  # a power of two: figure inches × DPI gives the exact pixel size
CLASS_COLOURS = matplotlib.colormaps["tab10"].colors
FILL_ALPHA = 0.35
Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class View:
    """RGB pixels of (part of) an image and the map from output coordinates to their pixels."""

    rgb: np.ndarray
    to_view: Affine


def class_colour(class_id: int) -> tuple[float, float, float]:
    """The colour of a class (tab10 by class id), RGB in 0–1."""
    return CLASS_COLOURS[int(class_id) % len(CLASS_COLOURS)]


def image_grid(source: RasterSource | SlideSource) -> tuple[tuple[int, int], Affine]:
    """((height, width) in pixels, pixel → output coordinates) of a source as opened by default."""
    return (source.height, source.width), source.transform


def _full_resolution(source: RasterSource | SlideSource) -> tuple[int, int, Affine]:
    """(width, height, pixel → output coordinates) of the image at full resolution."""
    if isinstance(source, RasterSource):
        with opened(source.path) as dataset:
            return dataset.width, dataset.height, dataset.transform
    width, height = source.level0_size
    return width, height, Affine.identity()


def _scaled(source: RasterSource | SlideSource, scale: float) -> RasterSource | SlideSource:
    """The source read at ``scale`` full-resolution pixels per pixel (≥ 1)."""
    if isinstance(source, RasterSource):
        width, height, transform = _full_resolution(source)
        w, h = max(1, round(width / scale)), max(1, round(height / scale))
        return replace(source, width=w, height=h, transform=transform @ Affine.scale(width / w, height / h), factor=float(np.sqrt(width / w * height / h)))
    from pipeline.slides import open_slide

    with warnings.catch_warnings():  # "microns" = level-0 pixels: not the file's µm, and said so
        warnings.simplefilter("ignore")
        return open_slide(source.path, target_mpp=scale, mpp=1.0, bands=source.bands)


def read_view(source: RasterSource | SlideSource, region: Region | None = None, max_size: int = 2048) -> View:
    """The whole image (or ``region``, in output coordinates) at most ``max_size`` pixels a side."""
    width, height, transform = _full_resolution(source)
    if region is None:
        c0, r0, c1, r1 = 0.0, 0.0, float(width), float(height)
    else:
        corners = np.column_stack(~transform @ tuple(shapely.get_coordinates(shapely.box(*region)).T))
        (c0, r0), (c1, r1) = np.clip(corners.min(0), 0, None), np.minimum(corners.max(0), (width, height))
        if c1 <= c0 or r1 <= r0:
            outline = shapely.transform(shapely.box(0, 0, width, height), lambda xy: np.column_stack(transform @ tuple(xy.T)))
            x0, y0, x1, y1 = shapely.bounds(outline)
            raise ValueError(f"region {tuple(region)} lies outside the image, which spans x {x0:.10g} to {x1:.10g}, "
                             f"y {y0:.10g} to {y1:.10g} in its output coordinates (its CRS, or pixels)")
    scaled = _scaled(source, max(1.0, max(c1 - c0, r1 - r0) / max_size))
    sx, sy = scaled.width / width, scaled.height / height
    cols = Span(math.floor(c0 * sx), min(scaled.width, max(math.ceil(c1 * sx), math.floor(c0 * sx) + 1)))
    rows = Span(math.floor(r0 * sy), min(scaled.height, max(math.ceil(r1 * sy), math.floor(r0 * sy) + 1)))
    pixels, _ = scaled.read(rows, cols)
    return View(pixels, Affine.translation(-cols.start, -rows.start) @ ~scaled.transform)


def _path(geometry: shapely.Geometry) -> MplPath:
    """One compound path (holes included) of a polygon or multipolygon."""
    parts = getattr(geometry, "geoms", [geometry])
    rings = [MplPath(np.asarray(ring.coords), closed=True) for part in parts for ring in [part.exterior, *part.interiors]]
    return MplPath.make_compound_path(*rings)


def render_overlay(
    image: str | Path | RasterSource | SlideSource,
    frame: gpd.GeoDataFrame,
    out_png: str | Path,
    region: Region | None = None,
    max_size: int = 2048,
) -> Path:
    """Instances coloured by class over the image (or ``region``); the PNG has the view's size."""
    source = open_image(image) if isinstance(image, (str, Path)) else image
    view = read_view(source, region, max_size)
    shown = frame if region is None else frame[frame.intersects(shapely.box(*region))]
    height, width = view.rgb.shape[:2]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(view.rgb, extent=(0, width, height, 0), interpolation="nearest")
    if len(shown):
        colours = [class_colour(c) for c in shown["class_id"]]
        ax.add_collection(PathCollection(
            [_path(g) for g in shapely.transform(shown.geometry.values, lambda xy: np.column_stack(view.to_view @ tuple(xy.T)))],
            facecolors=[(*c, FILL_ALPHA) for c in colours], edgecolors=colours, linewidths=72 / DPI,
        ))
        legend = dict(zip(shown["class"], shown["class_id"]))
        ax.legend(handles=[Patch(color=class_colour(i), label=n) for n, i in sorted(legend.items(), key=lambda x: x[1])],
                  loc="lower left", fontsize=9, framealpha=0.8)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return _save(fig, Path(out_png))


def density_grid(frame: gpd.GeoDataFrame, shape: tuple[int, int], transform: Affine, cell_size: int) -> np.ndarray:
    """Instances per cell of ``cell_size`` pixels (by representative point); rows × cols of cells."""
    cells = (math.ceil(shape[0] / cell_size), math.ceil(shape[1] / cell_size))
    points = shapely.get_coordinates(shapely.point_on_surface(frame.geometry.values))
    cols, rows = ~transform @ tuple(points.T)
    row = np.clip(np.floor(np.asarray(rows) / cell_size).astype(int), 0, cells[0] - 1)
    col = np.clip(np.floor(np.asarray(cols) / cell_size).astype(int), 0, cells[1] - 1)
    return np.bincount(row * cells[1] + col, minlength=cells[0] * cells[1]).reshape(cells)


def render_density(
    frame: gpd.GeoDataFrame, shape: tuple[int, int], transform: Affine, out_png: str | Path, cell_size: int = 256
) -> np.ndarray:
    """A heatmap of instances per cell (image pixels → cells of ``cell_size``), 640 pixels wide."""
    grid = density_grid(frame, shape, transform, cell_size)
    aspect = min(max(grid.shape[0] / grid.shape[1], 0.25), 4.0)
    fig = Figure(figsize=(10, round((10 * aspect * 0.85 + 1.5) * 8) / 8), dpi=DPI)
    ax = fig.subplots()
    shown = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(1, int(grid.max())), interpolation="nearest",
                      extent=(0, grid.shape[1] * cell_size, grid.shape[0] * cell_size, 0))
    bar = fig.colorbar(shown, ax=ax, label=f"instances per {cell_size}×{cell_size} px cell")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax.set_title(f"{len(frame)} instances")
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    _save(fig, Path(out_png))
    return grid


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        FigureCanvasAgg(fig).print_png(tmp)
    return path
