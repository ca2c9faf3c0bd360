"""Whole-slide images, read at the model's resolution: OpenSlide for vendor formats (SVS, NDPI,
MRXS, SCN, …), tifffile for OME-TIFF and other pyramidal TIFFs (SubIFD pyramids included).

The pyramid level is the coarsest one whose pixel size is no coarser than the model card's
resolution (20 % tolerance); when that level's pixels still differ from the model's by more than
5 %, windows are resampled (bilinear) so the model sees its native scale. Tiles are cut in these
*processed* pixels and the source's ``transform`` maps them back to level-0 pixels, so outputs are
always in level-0 pixel space. With slide-level normalisation, one colour mapping computed from
the thumbnail's tissue is applied to every tile (never per tile, which would put seams in colour).
"""

from __future__ import annotations

import logging
import re
import warnings
import xml.etree.ElementTree as ElementTree
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import openslide
import tifffile
import zarr
from affine import Affine
from PIL import Image
from rasterio.errors import RasterioIOError

from pipeline.grid import Span
from pipeline.handles import open_cached
from pipeline.sources import (
    RESAMPLE_TOLERANCE, SourceError, check_resampling, checked_value_range, image_stem, opened, percentile_range,
    read_error_reason, resample_factor, scaled_to_uint8,
)

TOLERANCE = 1.2
MAX_MICROSCOPE_MPP = 10.0  # coarser resolution tags are a default DPI, not a microscope's pixel size
# what reading a damaged file raises: the readers' own errors, and the codecs' (imagecodecs raises
# RuntimeErrors, Python's zlib its own error, tifffile ImportError for a codec it lacks)
READ_ERRORS = (
    openslide.OpenSlideError, tifffile.TiffFileError, OSError, ValueError, KeyError, RuntimeError, zlib.error, ImportError,
)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
GEOTIFF_TAGS = {33550, 33922, 34264, 34735, 50844}  # pixel scale, tie points, transformation, GeoKeys, RPCs
UM_PER_UNIT = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_slide(path: str | Path) -> bool:
    """Whether OpenSlide recognises a vendor slide format (plain TIFFs are not slides)."""
    return _openslide_format(path) is not None


def _openslide_format(path: str | Path) -> str | None:
    try:
        found = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None
    return None if found in (None, "generic-tiff") else found


def _is_tiff(path: str | Path) -> bool:
    """A TIFF by its first bytes, whatever its name says (a TIFF renamed .ndpi or .svs is one)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) in TIFF_MAGIC
    except OSError:
        return False


def is_tiff_slide(path: str | Path, mpp_given: bool = False) -> bool:
    """A TIFF that tifffile reads as a slide: an OME-TIFF; a pyramid (SubIFDs or reduced pages)
    without georeferencing; or a single image without georeferencing whose resolution tags give a
    microscope's pixel size (≤ 10 µm; 72 or 300 dpi do not), or for which ``--mpp`` is given (a
    region or TMA core exported from a slide, a microscope's 16-bit field: its µm per pixel is honoured).
    Georeferencing is GeoTIFF tags or sidecar files that GDAL reads (a world file, .aux.xml, .prj)."""
    if not _is_tiff(path):
        return False
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # a broken file is reported by its reader, naming it
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return True
            page = tif.pages.first
            if GEOTIFF_TAGS & set(page.tags.keys()):
                return False
            slide_like = len(tif.series[0].levels) > 1 or mpp_given or _tiff_mpp(tif) is not None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return False
    return slide_like and not _georeferenced_by_sidecar(path)


def _georeferenced_by_sidecar(path: str | Path) -> bool:
    """Whether GDAL puts a TIFF without GeoTIFF tags on the ground all the same: a world file
    (.tfw), an .aux.xml or a .prj beside it (GDAL's baseline-TIFF exports, ArcGIS deliveries), or
    RPCs in an .RPB or _rpc.txt (satellite imagery before orthorectification)."""
    try:
        with opened(path) as dataset:
            return (dataset.crs is not None or not dataset.transform.is_identity or bool(dataset.gcps[0])
                    or bool(dataset.rpcs))
    except RasterioIOError:
        return False


def choose_level(level_mpp: list[float], target_mpp: float | None) -> int:
    """The coarsest level not coarser than ``target_mpp`` × 1.2 (level 0 when none is)."""
    if target_mpp is None:
        return 0
    fitting = [k for k, mpp in enumerate(level_mpp) if mpp <= target_mpp * TOLERANCE]
    return max(fitting) if fitting else 0


@dataclass(frozen=True)
class SlideSource:
    """A slide read at pyramid ``level``, resampled by ``factor`` level pixels per processed pixel
    (``factor_down`` down, when its pixels are not square); ``height``/``width`` are the processed
    size, ``mpp`` the level-0 microns per pixel across (``mpp_down`` down, when it differs)."""

    path: str
    height: int
    width: int
    level: int
    downsample: float
    mpp: float | None
    level0_size: tuple[int, int] = (0, 0)
    level_size: tuple[int, int] = (0, 0)
    factor: float = 1.0
    backend: str = "openslide"
    colour: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    bands: tuple[int, ...] = (1, 2, 3)
    value_range: tuple[tuple[float, float], ...] | None = None  # per band, for non-8-bit pixels
    crs_wkt: str | None = None
    name: str | None = None  # the image's id in the outputs; default: the file's stem
    factor_down: float | None = None
    mpp_down: float | None = None

    @property
    def image_id(self) -> str:
        return self.name or image_stem(self.path)

    @property
    def mpp_sides(self) -> tuple[float, float] | None:
        """Level-0 microns per pixel (across, down); None when unknown."""
        return None if self.mpp is None else (self.mpp, self.mpp_down or self.mpp)

    @property
    def transform(self) -> Affine:
        """Processed pixels → level-0 pixels (per-axis ratio of the sizes, so edges match)."""
        width0, height0 = self.level0_size
        return Affine.scale(width0 / self.width, height0 / self.height)

    @property
    def pixel_scale(self) -> float:
        """Level-0 pixels per processed pixel along a side (geometric mean of the two axes)."""
        return float(np.sqrt(abs(self.transform.determinant)))

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, np.ndarray, float]:
        """(RGB thumbnail, valid mask, processed pixels per thumbnail pixel), read once."""
        try:
            rgba = _THUMBNAILS[self.backend](self.path, max_size, self.bands, self.value_range)
        except READ_ERRORS as err:
            raise SourceError(f"{self.path}: thumbnail read failed, the file may be truncated or corrupt ({read_error_reason(err)})") from None
        expected = max(1, round(rgba.shape[1] * self.height / self.width))
        if abs(rgba.shape[0] - expected) > 1:  # from a level squeezed in one direction (see consistent_levels)
            rgba = np.asarray(Image.fromarray(rgba).resize((rgba.shape[1], expected), Image.Resampling.NEAREST))
        return rgba[..., :3], rgba[..., 3] > 0, self.width / rgba.shape[1]

    def read(self, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 RGB (h, w, 3), valid mask) of a window given in processed pixels."""
        across, down = self.factor, self.factor_down or self.factor
        x0, y0 = cols.start * across, rows.start * down
        x1, y1 = min(cols.stop * across, self.level_size[0]), min(rows.stop * down, self.level_size[1])
        left, top = int(np.floor(x0)), int(np.floor(y0))
        right, bottom = max(int(np.ceil(x1)), left + 1), max(int(np.ceil(y1)), top + 1)
        reason = None
        try:
            rgba = _REGIONS[self.backend](
                self.path, self.level, self.downsample, left, top, right - left, bottom - top, self.bands, self.value_range
            )
        except READ_ERRORS as err:
            reason = read_error_reason(err)
        if reason is not None:  # raised outside the handler, so without the reader's errors chained
            raise SourceError(
                f"{self.path}: read failed at level {self.level}, rows {rows.start}:{rows.stop}, "
                f"the file may be truncated or corrupt ({reason})"
            )
        if (across, down) != (1.0, 1.0):
            box = (x0 - left, y0 - top, x1 - left, y1 - top)
            size = (max(1, round((x1 - x0) / across)), max(1, round((y1 - y0) / down)))
            size = (min(size[0], cols.length), min(size[1], rows.length))
            resized = Image.fromarray(rgba).resize(size, Image.Resampling.BILINEAR, box=box)
            rgba = np.zeros((rows.length, cols.length, 4), np.uint8)
            rgba[: size[1], : size[0]] = np.asarray(resized)
        valid = rgba[..., 3] > 127
        pixels = np.ascontiguousarray(rgba[..., :3])
        if self.colour is not None:
            gain, offset = (np.asarray(v, np.float32) for v in self.colour)
            pixels = np.clip(pixels * gain + offset, 0, 255).round().astype(np.uint8)
        pixels[~valid] = 0
        return pixels, valid

    def with_colour_normalisation(self, reference_mean: list[float], reference_std: list[float]) -> "SlideSource":
        """This source with one colour mapping, from the thumbnail's tissue to the reference
        statistics (per-channel mean and standard deviation, 0–255), applied to every tile."""
        from pipeline.tissue import tissue_mask

        thumbnail, valid, _ = self.thumbnail()
        mask = tissue_mask(thumbnail, valid, margin=0)
        pixels = thumbnail[mask if mask.sum() >= 100 else valid].astype(np.float64)
        if len(pixels) == 0:
            return self
        mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1.0)
        gain = np.asarray(reference_std) / std
        offset = np.asarray(reference_mean) - mean * gain
        return replace(self, colour=(tuple(map(float, gain)), tuple(map(float, offset))))


def _openslide_region(
    path: str, level: int, downsample: float, left: int, top: int, width: int, height: int, bands: tuple[int, ...],
    ranges: None = None,
) -> np.ndarray:
    """An RGBA window of a level (OpenSlide reads 8-bit RGBA only: no ``ranges``)."""
    with open_cached(path, openslide.OpenSlide) as slide:
        region = np.asarray(slide.read_region((round(left * downsample), round(top * downsample)), level, (width, height)))
    return _rgba(region[..., :3], region[..., 3], bands)


def _openslide_thumbnail(path: str, max_size: int, bands: tuple[int, ...], ranges: None = None) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        rgba = np.asarray(slide.get_thumbnail((max_size, max_size)).convert("RGBA"))
    return _rgba(rgba[..., :3], rgba[..., 3], bands)


def _tiff_level(tif: tifffile.TiffFile, level: int):
    """(zarr array of one pyramid level, its axes string)."""
    series = tif.series[0]
    return zarr.open(series.aszarr(level=level), mode="r"), series.levels[level].axes


def _tiff_channels(data: np.ndarray, axes: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Any tifffile axes order (YXS, CYX, TCZYX, …) → ((h, w, channels) as stored, alpha or None).
    A fourth sample of an RGBA page (axis S) is alpha; channels (axis C, e.g. fluorescence) never are."""
    keep = [a for a in axes if a in "YXCS"]
    index = tuple(slice(None) if a in keep else 0 for a in axes)
    data = np.asarray(data[index])
    order = [keep.index("Y"), keep.index("X")] + [i for i, a in enumerate(keep) if a in "CS"]
    data = data.transpose(order).reshape(data.shape[order[0]], data.shape[order[1]], -1)
    has_alpha = "S" in keep and data.shape[2] == 4
    return (data[..., :3], data[..., 3]) if has_alpha else (data, None)


def _tiff_rgba(data: np.ndarray, axes: str, bands: tuple[int, ...], ranges=None) -> np.ndarray:
    """(h, w, 4) uint8 RGBA of ``bands``; non-8-bit channels mapped linearly from ``ranges``
    (one (low, high) per band) to 0–255."""
    channels, alpha = _tiff_channels(data, axes)
    if ranges is None:
        if channels.dtype != np.uint8:
            raise ValueError(f"{channels.dtype} pixels without a value range")
        return _rgba(channels, alpha, bands)
    low, high = (np.asarray(r, np.float32) for r in zip(*ranges))
    scaled = scaled_to_uint8(channels[..., [b - 1 for b in bands]], low, high)
    return _rgba(scaled, alpha if alpha is None else (alpha > 0).astype(np.uint8) * 255, (1, 2, 3))


def _rgba(channels: np.ndarray, alpha: np.ndarray | None, bands: tuple[int, ...]) -> np.ndarray:
    """(h, w, 4): the three 1-based ``bands`` of ``channels``, then alpha (opaque without one)."""
    alpha = np.full(channels.shape[:2], 255, np.uint8) if alpha is None else alpha
    return np.dstack([channels[..., [b - 1 for b in bands]], alpha])


def _tiff_region(
    path: str, level: int, downsample: float, left: int, top: int, width: int, height: int, bands: tuple[int, ...],
    ranges=None,
) -> np.ndarray:
    with open_cached(path, tifffile.TiffFile) as tif:
        array, axes = _tiff_level(tif, level)
        index = tuple(
            slice(top, top + height) if a == "Y" else slice(left, left + width) if a == "X" else slice(None) for a in axes
        )
        data = _tiff_rgba(array[index], axes, bands, ranges)
    out = np.zeros((height, width, 4), np.uint8)
    out[: data.shape[0], : data.shape[1]] = data
    return out


def _tiff_thumbnail(path: str, max_size: int, bands: tuple[int, ...], ranges=None) -> np.ndarray:
    return _tiff_rgba(*_tiff_thumbnail_data(path, max_size), bands, ranges)


def _tiff_thumbnail_data(path: str, max_size: int) -> tuple[np.ndarray, str]:
    """(pixels as stored, axes) of the smallest pyramid level at least ``max_size`` / 2 on its long
    side, decimated to fit."""
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        sides = [max(lv.shape[lv.axes.index("Y")], lv.shape[lv.axes.index("X")]) for lv in levels]
        big_enough = [k for k, side in enumerate(sides) if side >= max_size // 2] or [0]
        level = max(big_enough)
        array, axes = _tiff_level(tif, level)
        step = max(1, int(np.ceil(sides[level] / max_size)))
        index = tuple(slice(None, None, step) if a in "YX" else slice(None) for a in axes)
        return np.asarray(array[index]), axes


_REGIONS = {"openslide": _openslide_region, "tifffile": _tiff_region}
_THUMBNAILS = {"openslide": _openslide_thumbnail, "tifffile": _tiff_thumbnail}


def _tiff_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """Level-0 microns per pixel (across, down) from OME PhysicalSizeX/Y, an Aperio description's
    ``MPP``, else the TIFF resolution tags when they give a microscope's pixel size (≤ ``MAX_MICROSCOPE_MPP``)."""
    if tif.is_ome:
        pixels = ElementTree.fromstring(tif.ome_metadata).find(".//{*}Pixels")
        if pixels is not None and pixels.get("PhysicalSizeX"):
            x, y = (
                float(pixels.get(f"PhysicalSize{a}", pixels.get("PhysicalSizeX"))) * UM_PER_UNIT.get(pixels.get(f"PhysicalSize{a}Unit", "µm"), 1.0)
                for a in "XY"
            )
            return x, y
    if tif.is_svs and (found := re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tif.pages.first.description or "")):
        return (float(found.group(1)),) * 2  # an Aperio slide OpenSlide could not open (damaged, truncated): read by tifffile
    tags = tif.pages.first.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value))
        sides = [tags[name].value if name in tags else tags["XResolution"].value for name in ("XResolution", "YResolution")]
        if per_unit and all(n > 0 and d > 0 for n, d in sides):
            x, y = (per_unit * d / n for n, d in sides)
            return (x, y) if max(x, y) <= MAX_MICROSCOPE_MPP else None  # 72 or 300 dpi: a default, not a pixel size
    return None


def _describe_openslide(path: Path) -> tuple[tuple[float, float] | None, list[tuple[int, int]], int, np.dtype]:
    with openslide.OpenSlide(str(path)) as slide:
        x, y = (slide.properties.get(key) for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y))
        sides = (float(x), float(y or x)) if x else None
        return sides, list(slide.level_dimensions), 3, np.dtype(np.uint8)


AXIS_NAMES = {"Z": "focal planes (Z)", "T": "time points", "I": "pages", "Q": "planes", "R": "tiles", "E": "lambda planes"}


def _describe_tiff(path: Path) -> tuple[tuple[float, float] | None, list[tuple[int, int]], int, np.dtype]:
    """(level-0 µm per pixel across and down, level sizes, colour channels (an RGBA page's alpha not counted), dtype)."""
    with tifffile.TiffFile(path) as tif:
        if tif.is_svs:  # only those OpenSlide refuses come here
            warnings.warn(f"{path}: an Aperio slide that OpenSlide cannot open (damaged or truncated?); "
                          "read through tifffile from its full-resolution image", stacklevel=3)
        levels = tif.series[0].levels
        planes = [f"{n} {AXIS_NAMES.get(a, a)}" for a, n in zip(levels[0].axes, levels[0].shape) if a not in "YXCS" and n > 1]
        if planes or (len(tif.series) > 1 and not tif.is_svs):  # an SVS's other series are its label and macro images
            held = ", ".join(planes + ([f"{len(tif.series)} images"] if len(tif.series) > 1 else []))
            warnings.warn(f"{path}: {held} in the file; only the first plane of the first image is read", stacklevel=3)
        sizes = [(lv.shape[lv.axes.index("X")], lv.shape[lv.axes.index("Y")]) for lv in levels]
        samples = {a: levels[0].shape[levels[0].axes.index(a)] for a in "CS" if a in levels[0].axes}
        channels = int(np.prod(list(samples.values()), dtype=int))
        return _tiff_mpp(tif), sizes, 3 if samples == {"S": 4} else channels, np.dtype(levels[0].dtype)


def slide_value_range(
    path: Path, dtype: np.dtype, bands: tuple[int, ...], value_range: tuple[float, float] | None
) -> tuple[tuple[float, float], ...] | None:
    """Per band, what maps to 0–255: ``value_range``, else the 0.5th–99.5th percentiles of the
    thumbnail's finite values, once per slide (never per tile: tiles would differ in brightness).
    None for 8-bit slides, which are read as they are."""
    if dtype == np.uint8:
        if value_range is not None:
            warnings.warn(f"{path}: --value-range is for non-8-bit pixels; this 8-bit slide is read as it is", stacklevel=3)
        return None
    if value_range is not None:
        return (checked_value_range(value_range),) * len(bands)
    channels, _ = _tiff_channels(*_tiff_thumbnail_data(str(path), 1024))
    ranges = [percentile_range(channels[..., band - 1].astype(np.float64).ravel()) for band in bands]
    shown = f"range {ranges[0]}" if len(set(ranges)) == 1 else f"per-channel ranges {tuple(ranges)}"
    warnings.warn(f"{path}: {dtype} data scaled to 8 bits from {shown}", stacklevel=3)
    return tuple(ranges)


def slide_bands(path: Path, bands: tuple[int, ...] | None, channels: int) -> tuple[int, int, int]:
    """The three 1-based channels a model sees: ``bands`` (one is repeated), or the file's own
    RGB; a grey slide repeats its channel."""
    if bands is None:
        if channels == 2:
            raise SourceError(f"{path}: 2 channels; choose one (or three) with --bands")
        if channels > 3:
            warnings.warn(f"{path}: {channels} channels, the first three used (--bands picks others)", stacklevel=3)
        return (1, 1, 1) if channels == 1 else (1, 2, 3)
    if max(bands) > channels:
        raise SourceError(f"{path}: --bands {','.join(map(str, bands))}: the slide has {channels} channel(s)")
    if len(bands) not in (1, 3):
        raise SourceError(f"{path}: --bands {','.join(map(str, bands))}: slides take one band or three")
    return tuple(bands * 3 if len(bands) == 1 else bands)


def consistent_levels(sizes: list[tuple[int, int]]) -> list[int]:
    """Levels whose height follows their width's downsample (within 2 px and 2 %): a level
    squeezed in one direction would put tiles and tissue in the wrong rows."""
    (width0, height0) = sizes[0]
    keep = []
    for k, (width, height) in enumerate(sizes):
        expected = height0 * width / width0
        if abs(height - expected) <= max(2.0, 0.02 * expected):
            keep.append(k)
    return keep


def open_slide(
    path: str | Path, target_mpp: float | None = None, mpp: float | None = None, bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
) -> SlideSource:
    """Open a slide (OpenSlide or pyramidal TIFF); ``mpp`` overrides (or supplies) its level-0
    microns per pixel. The level and resampling follow ``target_mpp`` (the model's resolution);
    ``bands`` picks channels (1-based; see ``slide_bands``); non-8-bit pixels are mapped to 8 bits
    (see ``slide_value_range``)."""
    path = Path(path)
    backend = "openslide" if is_slide(path) else "tifffile"
    try:
        found, sizes, channels, dtype = _describe_openslide(path) if backend == "openslide" else _describe_tiff(path)
        chosen_bands = slide_bands(path, bands, channels)
        ranges = slide_value_range(path, dtype, chosen_bands, value_range)
    except SourceError:
        raise
    except (*READ_ERRORS, IndexError) as err:
        raise SourceError(f"{path}: not a readable slide ({read_error_reason(err)})") from None
    if mpp is not None and found and abs(mpp / found[0] - 1) > 0.05:
        warnings.warn(f"{path}: --mpp {mpp:g} overrides the file's {found[0]:g} µm per pixel", stacklevel=2)
    sides = (mpp, mpp) if mpp is not None else found
    level0 = sides[0] if sides else None
    if level0 is None and target_mpp is not None:
        raise SourceError(f"{path}: no resolution metadata (microns per pixel); pass --mpp")
    square = sides is None or abs(sides[1] / sides[0] - 1) <= RESAMPLE_TOLERANCE
    if not square:
        shown = f"resampled axis by axis to the model's {target_mpp:g} µm" if target_mpp else "areas measured with both sides"
        warnings.warn(f"{path}: pixels are {sides[0]:g} × {sides[1]:g} µm (across × down); {shown}", stacklevel=2)
    usable = consistent_levels(sizes)
    if len(usable) < len(sizes):
        skipped = ", ".join(f"{k} ({w}×{h})" for k, (w, h) in enumerate(sizes) if k not in usable)
        warnings.warn(f"{path}: pyramid level(s) {skipped} not scaled like level 0 in both directions: not used", stacklevel=2)
    downsamples = [sizes[0][0] / sizes[k][0] for k in usable]
    equal_area = float(np.sqrt(sides[0] * sides[1])) if sides else None
    chosen = choose_level([equal_area * d for d in downsamples] if sides else downsamples, target_mpp)
    level = usable[chosen]
    width, height = sizes[level]
    if square:  # one factor, by the level's downsample across (levels may round their sizes differently down)
        across = down = resample_factor(level0 * downsamples[chosen] if sides else None, target_mpp)
    else:
        across, down = (resample_factor(side * downsamples[chosen], target_mpp) for side in sides)
    level_sides = tuple(side * downsamples[chosen] for side in sides) if sides else (None, None)
    check_resampling(path, (across, down), level_sides, target_mpp, "µm")
    return SlideSource(
        str(path.resolve()), max(1, round(height / down)), max(1, round(width / across)), level,
        float(downsamples[chosen]), level0, sizes[0], (width, height), across, backend,
        bands=chosen_bands, value_range=ranges,
        factor_down=None if down == across else down, mpp_down=None if square else sides[1],
    )
