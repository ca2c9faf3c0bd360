"""Raster sources over rasterio: window reads (never the whole image) scaled to uint8 RGB.

Scaling rule, documented for users: 8-bit data is used as is. Any other data type (16-bit,
float, …) is mapped linearly from a per-band value range to 0–255 and clipped; the range is
either given by the user or taken once per image as the 0.5th–99.5th percentiles of valid
pixels in a decimated overview (never per tile, which would put seams in the colours).
One-band images are repeated to three channels; with four or more bands the first three are
used unless ``bands`` says otherwise. Nodata, NaN and alpha/mask-band pixels are invalid: they
are set to 0 and tiles without valid pixels are not sent to the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyproj
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader
from rasterio.transform import from_gcps, xy
from rasterio.windows import Window

from pipeline.grid import Span
from pipeline.ground_area import lon_lat_degrees
from pipeline.handles import open_cached

OVERVIEW_SIZE = 1024
RESAMPLE_TOLERANCE = 0.05  # pixel sizes this close to the model's are read as they are
MAX_UPSAMPLING = 8.0


def image_stem(path: str | Path) -> str:
    """A file's name without its extension(s): ``a.tif`` → ``a``, ``b.ome.tiff`` → ``b``."""
    stem = Path(path).stem
    return stem[: -len(".ome")] if stem.lower().endswith(".ome") else stem


def read_error_reason(err: BaseException) -> str:
    """The messages of ``err`` and its causes, GDAL's own included ("See previous exception"
    placeholders left out). Workers raise ``SourceError`` with it and without the causes chained:
    GDAL's error classes do not survive pickling back to the client, which then sees a bare
    ``Exception``."""
    messages, seen, cause = [], set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = " ".join(str(cause).split())
        if text and "see previous exception" not in text.lower() and text not in messages:
            messages.append(text)
        cause = cause.__cause__ or cause.__context__
    return "; ".join(messages) or type(err).__name__


class SourceError(ValueError):
    """An image that cannot be read as asked; the message (one line) names the file and the cause."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class RasterSource:
    """What a worker needs to read windows of one raster: small and picklable."""

    path: str
    height: int
    width: int
    bands: tuple[int, ...]
    dtype: str
    value_range: tuple[tuple[float, float], ...] | None
    transform: Affine
    crs_wkt: str | None
    factor: float = 1.0
    palette: tuple[tuple[int, int, int, int], ...] | None = None  # RGBA per value of a colour-mapped band
    name: str | None = None  # the image's id in the outputs; default: the file's stem
    microns: float | None = None  # µm per image pixel of a microscopy image without a CRS (given as --mpp)

    @property
    def image_id(self) -> str:
        return self.name or image_stem(self.path)

    @property
    def mpp(self) -> float | None:
        """Microns per image pixel, when given: georeferenced rasters measure in CRS units instead."""
        return self.microns

    @property
    def mpp_sides(self) -> tuple[float, float] | None:
        return None if self.microns is None else (self.microns, self.microns)

    @property
    def pixel_scale(self) -> float:
        """Image pixels per processed pixel (> 1 when resampled to a coarser model resolution)."""
        return self.factor

    def read(self, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
        return read_window(self, rows, cols)


def _overview_range(dataset, bands: tuple[int, ...]) -> tuple[tuple[float, float], ...]:
    scale = max(dataset.height, dataset.width) / OVERVIEW_SIZE
    shape = (max(1, int(dataset.height / max(scale, 1))), max(1, int(dataset.width / max(scale, 1))))
    data = dataset.read(list(bands), out_shape=(len(bands), *shape), masked=True).astype(np.float64)
    return tuple(percentile_range(band.compressed()) for band in data)


def percentile_range(values: np.ndarray) -> tuple[float, float]:
    """The 0.5th–99.5th percentiles of the finite ``values``: what maps to 0–255 (never empty)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def scaled_to_uint8(data: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``data`` mapped linearly from [low, high] (broadcast) to 0–255, clipped; NaN to 0."""
    data = data.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # nodata of -3.4e38 and the like: clipped, and masked anyway
        return np.clip(np.nan_to_num((data - low) / (high - low) * 255, nan=0.0), 0, 255).round().astype(np.uint8)


def open_raster(
    path: str | Path,
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    channels: int = 3,
    target_m: float | None = None,
    mpp: float | None = None,
    target_mpp: float | None = None,
) -> RasterSource:
    """Open, validate and describe a raster; errors name the file and the problem. With
    ``target_m`` (the model's metres per pixel) a projected raster whose pixels differ from it by
    more than 5 % is resampled on read, and its ``transform`` describes the processed grid. A
    raster without a CRS given ``mpp`` (µm per pixel: a microscope's PNG or JPEG) is resampled to
    ``target_mpp`` the same way."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: file not found")
    if path.is_dir():
        raise SourceError(f"{path}: a directory, not an image file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: empty file (0 bytes)")
    try:
        with opened(path) as dataset:
            return _describe(dataset, path, bands, value_range, channels, target_m, mpp, target_mpp)
    except RasterioIOError as err:
        raise SourceError(f"{path}: not a readable raster ({err})") from err


def pixel_size_m(crs_wkt: str | None, transform: Affine, width: int, height: int) -> float | None:
    """Ground metres per pixel (the side of a square of equal area) of a georeferenced raster,
    geodesic at the image centre; None without a CRS."""
    sides = pixel_sides_m(crs_wkt, transform, width, height)
    return None if sides is None else float(np.sqrt(sides[0] * sides[1]))


def pixel_sides_m(crs_wkt: str | None, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """(across, down) ground metres of a pixel at the image centre, on the ellipsoid: a projection's
    own metres are not the ground's (Web Mercator's are 1/cos(latitude) of them: half at 60°);
    None without a CRS. A CRS not tied to the Earth (a site grid) measures in its own units."""
    if crs_wkt is None:
        return None
    col, row = width // 2, height // 2
    xs, ys = xy(transform, [row, row, row + 1], [col, col + 1, col], offset="ul")
    degrees = lon_lat_degrees(crs_wkt, xs, ys)
    crs = pyproj.CRS.from_wkt(crs_wkt)
    if degrees is None:
        unit = crs.axis_info[0].unit_conversion_factor
        return float(np.hypot(transform.a, transform.d) * unit), float(np.hypot(transform.b, transform.e) * unit)
    lon, lat = degrees
    geod = crs.get_geod()
    return float(geod.line_length(lon[:2], lat[:2])), float(geod.line_length(lon[::2], lat[::2]))


def resample_factor(pixel_size: float | None, target: float | None) -> float:
    """Source pixels per processed pixel: 1 unless ``pixel_size`` is more than 5 % off ``target``."""
    if pixel_size is None or target is None:
        return 1.0
    factor = target / pixel_size
    return 1.0 if abs(factor - 1) <= RESAMPLE_TOLERANCE else factor


def check_resampling(path: Path, factors: tuple[float, float], sides: tuple, target: float | None, unit: str) -> None:
    """Refuse reads upsampled more than ``MAX_UPSAMPLING`` times along either axis: a pixel size that
    far from the model's is a metadata (or ``--mpp``) mistake, and the processed image would be
    enormous. Downsampling that much is said: it may be meant (5 cm drone pixels for a 0.5 m model),
    or the same mistake the other way, which would leave objects a pixel or two wide."""
    for factor, side in zip(factors, sides):
        if factor < 1 / MAX_UPSAMPLING:
            raise SourceError(
                f"{path}: pixels of {side:.3g} {unit}, the model's are {target:.3g} {unit}: refusing to upsample "
                f"{1 / factor:.0f}× (check the image's georeferencing, resolution metadata or --mpp)"
            )
    if max(factors) > MAX_UPSAMPLING:
        side = sides[int(np.argmax(factors))]
        warnings.warn(f"{path}: pixels of {side:.3g} {unit}, the model's are {target:.3g} {unit}: read at 1/{max(factors):.0f} "
                      "of the resolution (check the resolution metadata or --mpp if that is not meant)", stacklevel=4)


def _describe(dataset, path: Path, bands, value_range, channels: int, target_m: float | None = None,
              mpp: float | None = None, target_mpp: float | None = None) -> RasterSource:
    if dataset.width == 0 or dataset.height == 0:
        raise SourceError(f"{path}: image has no pixels ({dataset.width}×{dataset.height})")
    colour = [i for i in range(1, dataset.count + 1) if dataset.colorinterp[i - 1].name != "alpha"]
    tagged = {dataset.colorinterp[i - 1]: i for i in colour}
    rgb = tuple(tagged.get(c) for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
    if bands is None:
        if channels == 3 and None not in rgb:  # the file says where red, green and blue are (BGR, BGRN)
            bands = rgb
            if rgb != tuple(colour[:3]):
                warnings.warn(f"{path}: bands {','.join(map(str, rgb))} read as red, green, blue (their colour tags)", stacklevel=3)
        elif len(colour) == 1:
            bands = (colour[0],) * channels
        elif len(colour) >= channels:
            bands = tuple(colour[:channels])
        else:
            raise SourceError(
                f"{path}: {len(colour)} colour bands, the model needs {channels} (or 1, repeated); choose with --bands"
            )
    bands = tuple(int(b) for b in bands)
    if len(bands) == 1:
        bands = bands * channels
    if missing := sorted({b for b in bands if not 1 <= b <= dataset.count}):
        raise SourceError(f"{path}: no band {', '.join(map(str, missing))}: the image has {dataset.count} band(s)")
    if len(bands) != channels:
        raise SourceError(f"{path}: {len(bands)} bands chosen, the model needs {channels} (or 1, repeated)")
    for band in (i for i in range(1, dataset.count + 1) if dataset.colorinterp[i - 1] == ColorInterp.alpha):
        _warn_if_not_transparency(dataset, path, band)
    dtype = dataset.dtypes[bands[0] - 1]
    if dtype.startswith("complex"):
        raise SourceError(f"{path}: {dtype} pixels (complex SAR data): convert to amplitude or intensity first")
    palette = _palette(dataset, bands)
    bits = int(dataset.tags(bands[0], ns="IMAGE_STRUCTURE").get("NBITS", 8)) if dtype == "uint8" else 8
    if palette is not None or (dtype == "uint8" and value_range is None and bits == 8):
        ranges = None
    elif value_range is None and bits < 8:  # 1- to 7-bit pixels (a bilevel scan reads 0 / 1): their full range
        ranges = ((0.0, float(2**bits - 1)),) * len(bands)
    elif value_range is not None:
        try:
            ranges = (checked_value_range(value_range),) * len(bands)
        except ValueError as err:
            raise SourceError(f"{path}: value range {value_range}: {err}") from None
    else:
        ranges = _overview_range(dataset, bands)
        warnings.warn(f"{path}: {dtype} data scaled to 8 bits from per-band ranges {ranges}", stacklevel=3)
    if len(dataset.subdatasets) > 1:  # a multi-page TIFF (not a pyramid: those are overviews)
        warnings.warn(f"{path}: {len(dataset.subdatasets)} images in the file; only the first is read", stacklevel=3)
    crs_wkt, transform = _georeferencing(dataset, path)
    microns = mpp if crs_wkt is None else None  # a CRS measures the pixels itself
    if microns is not None:
        sides, target, unit = (microns, microns), target_mpp, "µm"
    else:  # each axis to the model's metres: lon/lat pixels are far from square away from the equator
        sides = (pixel_sides_m(crs_wkt, transform, dataset.width, dataset.height) if target_m else None) or (None, None)
        target, unit = target_m, "m"
    across, down = (resample_factor(side, target) for side in sides)
    check_resampling(path, (across, down), sides, target, unit)
    height, width = max(1, round(dataset.height / down)), max(1, round(dataset.width / across))
    factor = float(np.sqrt(dataset.width / width * dataset.height / height))  # of the rounded grid, by area
    return RasterSource(
        path=str(path.resolve()),
        height=height,
        width=width,
        bands=bands,
        dtype=dtype,
        value_range=ranges,
        transform=transform @ Affine.scale(dataset.width / width, dataset.height / height),
        crs_wkt=crs_wkt,
        factor=factor,
        palette=palette,
        microns=microns,
    )


def _warn_if_not_transparency(dataset, path: Path, band: int, graded_share: float = 0.05) -> None:
    """Warn when a band tagged alpha holds graded values over much of the image, as a near-infrared
    band tagged alpha does (RGBN written as RGBA): its low pixels are then taken for no data."""
    scale = max(1.0, max(dataset.height, dataset.width) / 512)
    shape = (max(1, round(dataset.height / scale)), max(1, round(dataset.width / scale)))
    values = dataset.read(band, out_shape=shape, resampling=Resampling.nearest)
    full = np.iinfo(values.dtype).max if values.dtype.kind in "iu" else 1.0
    graded = float(((values > 0) & (values < full)).mean())
    if graded > graded_share:
        warnings.warn(
            f"{path}: band {band} is tagged alpha but {graded:.0%} of its pixels are neither transparent nor opaque "
            f"(a near-infrared band tagged alpha?); its zero pixels are read as no data. If it is not transparency, "
            f"clear the tag (gdal_edit -colorinterp_{band} undefined)", stacklevel=4,
        )


GCP_FIT_TOLERANCE = 0.5  # pixels: GCPs fitted no worse than this by one affine transform are used through it


def _georeferencing(dataset, path: Path) -> tuple[str | None, Affine]:
    """The CRS (WKT) and pixel → CRS transform of a raster's outputs. Without a geotransform (GDAL
    then reports the identity), GCPs that one affine transform fits within ``GCP_FIT_TOLERANCE``
    pixels give that transform; otherwise outputs are in pixel coordinates, and a warning names
    what was not used (a CRS alone, GCPs that need a warp, RPCs)."""
    if not dataset.transform.is_identity:
        return (dataset.crs.to_wkt() if dataset.crs else _crs_of_prj(Path(path))), dataset.transform
    gcps, gcp_crs = dataset.gcps
    if len(gcps) >= 3 and gcp_crs is not None:
        fit = from_gcps(gcps)
        residual = max(float(np.hypot(*np.subtract(~fit @ (g.x, g.y), (g.col, g.row)))) for g in gcps)
        if residual <= GCP_FIT_TOLERANCE:
            warnings.warn(f"{path}: georeferenced by its {len(gcps)} GCPs, through the affine transform that fits "
                          f"them (largest residual {residual:.2g} px)", stacklevel=4)
            return gcp_crs.to_wkt(), fit
        unused = f"{len(gcps)} GCPs that no affine transform fits (largest residual {residual:.1f} px)"
    elif dataset.rpcs:
        unused = "RPCs only"
    elif dataset.crs:
        unused = f"a CRS ({dataset.crs.to_string()[:60]}) but no geotransform"
    else:
        return None, dataset.transform
    warnings.warn(f"{path}: georeferenced by {unused}, which Seamline does not use; orthorectify it first "
                  "(e.g. gdalwarp) to get polygons in a CRS", stacklevel=4)
    return None, dataset.transform


def _crs_of_prj(path: Path) -> str | None:
    """The CRS in a ``.prj`` beside an image that a world file places (ArcGIS writes one; GDAL reads
    it for few formats, JPEG and PNG not), as WKT; None without one."""
    prj = path.with_suffix(".prj")
    if not prj.is_file():
        return None
    try:
        wkt = pyproj.CRS.from_user_input(prj.read_text()).to_wkt()
    except (pyproj.exceptions.CRSError, OSError, UnicodeDecodeError) as err:
        warnings.warn(f"{prj}: not a readable CRS ({err}); polygons have none", stacklevel=5)
        return None
    warnings.warn(f"{path}: CRS read from {prj.name}", stacklevel=5)
    return wkt


def checked_value_range(value_range) -> tuple[float, float]:
    """``value_range`` as (LO, HI) floats; ValueError unless two finite numbers with LO < HI."""
    try:
        lo, hi = map(float, value_range)
    except (TypeError, ValueError):
        raise ValueError("expected two numbers LO,HI") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError("needs two finite numbers LO,HI with LO < HI")
    return lo, hi


def _palette(dataset, bands: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...] | None:
    """The colour map of ``bands`` when they are one colour-mapped band (RGBA per value, values
    outside the map transparent), else None: such a band holds indices, not intensities."""
    band = bands[0]
    if set(bands) != {band} or dataset.colorinterp[band - 1] != ColorInterp.palette:
        return None
    try:
        colours = dataset.colormap(band)
    except ValueError:  # a palette band without a colour table: read its values as they are
        return None
    return tuple(colours.get(value, (0, 0, 0, 0)) for value in range(max(colours) + 1))


GDAL_BLOCK_CACHE = 128 * 2**20  # bytes


@cache
def _bound_block_cache() -> None:
    """Kept handles (``pipeline.handles``) keep their decoded blocks in GDAL's cache, 5 % of RAM by
    default: a 20k² run grew by 1.2 GB. Bound it, unless the environment sets ``GDAL_CACHEMAX``."""
    if "GDAL_CACHEMAX" not in os.environ and get_gdal_config("GDAL_CACHEMAX") > GDAL_BLOCK_CACHE:
        set_gdal_config("GDAL_CACHEMAX", GDAL_BLOCK_CACHE)


def open_quietly(path: str | Path):
    """``rasterio.open`` without the warning for rasters that have no georeferencing (they are read
    in pixel coordinates, and the run says so once), GDAL's block cache bounded."""
    _bound_block_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


@contextmanager
def opened(path: str | Path) -> Iterator[DatasetReader]:
    """``open_quietly(path)`` for a ``with`` block, read inside a ``rasterio.Env``: outside one, GDAL
    prints its messages to stderr itself (``Warning 1: TIFFFetchNormalTag …`` for a harmless bad tag)."""
    with rasterio.Env(), open_quietly(path) as dataset:
        yield dataset


def read_window(source: RasterSource, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels (h, w, channels), valid mask (h, w)) for one window of the image. 8-bit
    bands are decoded straight into the pixel-interleaved array (no band-first copy)."""
    shape = (rows.length, cols.length)
    bands = list(source.bands)
    reason = None
    try:
        with rasterio.Env(), open_cached(source.path, open_quietly) as dataset:
            resampled = (dataset.width, dataset.height) != (source.width, source.height)
            if not resampled:
                window = Window(cols.start, rows.start, cols.length, rows.length)
            else:
                sx, sy = dataset.width / source.width, dataset.height / source.height
                window = Window(cols.start * sx, rows.start * sy, cols.length * sx, rows.length * sy)
            resampling = dict(resampling=Resampling.bilinear) if resampled else {}
            if source.palette is not None:
                index = dataset.read(bands[0], window=window, out_shape=shape, resampling=Resampling.nearest)
            elif source.value_range is None:
                pixels = np.empty((*shape, len(bands)), np.uint8)
                dataset.read(bands, window=window, out=pixels.transpose(2, 0, 1), **resampling)
            else:
                data = dataset.read(bands, window=window, out_shape=(len(bands), *shape), **resampling)
            if all(dataset.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands):
                valid = np.ones(shape, bool)
            else:
                nearest = dict(out_shape=shape, resampling=Resampling.nearest) if resampled else {}
                valid = dataset.dataset_mask(window=window, **nearest) > 0
    except OSError as err:  # RasterioIOError, or a file gone since it was opened
        reason = read_error_reason(err)
    if reason is not None:  # raised outside the handler, so without GDAL's errors chained
        raise SourceError(
            f"{source.path}: read failed at rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop}, "
            f"the file may be truncated or corrupt ({reason})"
        )
    if source.palette is not None:
        colours = np.asarray(source.palette, np.uint8)[np.minimum(index, len(source.palette) - 1)]
        colours[index >= len(source.palette)] = 0
        pixels = np.ascontiguousarray(colours[..., : len(bands)])
        valid &= colours[..., 3] > 0
    elif source.value_range is not None:
        valid &= np.isfinite(data).all(0)
        low, high = (np.asarray(r, np.float32)[:, None, None] for r in zip(*source.value_range))
        pixels = np.ascontiguousarray(scaled_to_uint8(data, low, high).transpose(1, 2, 0))
    if not valid.all():
        pixels[~valid] = 0
    return pixels, valid


def valid_overview(source: RasterSource, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """(mask of pixels with data, processed pixels per mask pixel) from a decimated read of the
    nodata / alpha mask and, for float data, of where the chosen bands are finite (NaN collars come
    without a nodata tag), dilated by two mask pixels so thin strips of data are never dropped."""
    from scipy import ndimage

    scale = max(1.0, max(source.height, source.width) / max_size)
    shape = (max(1, int(np.ceil(source.height / scale))), max(1, int(np.ceil(source.width / scale))))
    mask = np.ones(shape, bool)
    with opened(source.path) as dataset:
        if not all(flags == [MaskFlags.all_valid] for flags in dataset.mask_flag_enums):
            mask = dataset.dataset_mask(out_shape=shape, resampling=Resampling.average) > 0
        if np.dtype(source.dtype).kind == "f":
            bands = sorted(set(source.bands))
            values = dataset.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest, masked=False)
            mask &= np.isfinite(values).all(axis=0)
    if mask.all():
        return mask, scale
    return ndimage.binary_dilation(mask, iterations=2), source.width / shape[1]


def open_image(
    path: str | Path,
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    channels: int = 3,
    target_mpp: float | None = None,
    mpp: float | None = None,
    target_m: float | None = None,
):
    """A slide source for vendor slide formats (OpenSlide) and OME / pyramidal TIFFs (tifffile),
    a raster source for the rest."""
    from pipeline.slides import is_slide, is_tiff_slide, open_slide

    if Path(path).is_file() and (is_slide(path) or is_tiff_slide(path, mpp is not None)):
        return open_slide(path, target_mpp=target_mpp, mpp=mpp, bands=bands, value_range=value_range)
    source = open_raster(path, bands=bands, value_range=value_range, channels=channels, target_m=target_m,
                         mpp=mpp, target_mpp=target_mpp)
    if mpp is not None and source.crs_wkt is not None:
        warnings.warn(f"{path}: --mpp ignored: a georeferenced raster's pixel size comes from its CRS", stacklevel=2)
    return source
