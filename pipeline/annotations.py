"""Annotation formats → ``AnnotatedImage`` (pixels + instance label image + classes).

Images are read through ``pipeline.sources`` so training and evaluation see exactly the pixels
inference sees (same band and 16-bit scaling rules). Every error names the file and the problem.

Rules shared by the readers:

- Polygons are in pixel coordinates with (0, 0) the top-left corner of the top-left pixel (or in
  map coordinates for GeoTIFFs); a pixel belongs to a polygon when its centre lies inside. Invalid
  polygons are repaired (``make_valid``), clipped to the image, and dropped when no area is left.
- Overlapping objects: larger ones are drawn first so smaller ones stay visible on top.
- Objects left without pixels are dropped and ids renumbered 1..n (``classes[i]`` is id ``i + 1``).
- ``resolution``: µm/px from ImageScope's ``MicronsPerPixel``; for georeferenced images the pixel
  size in metres (the side of a square of equal area, geodesic at the image centre for lon/lat
  rasters); otherwise None. ``pixel_sides`` holds (across, down): lon/lat pixels are far from square.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import psutil
import pyogrio
import shapely
from affine import Affine
from pycocotools import mask as mask_utils
from rasterio import features
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from scipy import ndimage
from shapely import affinity

from pipeline.grid import Span
from pipeline.sources import (
    RESAMPLE_TOLERANCE, RasterSource, SourceError, open_raster, opened, pixel_sides_m, read_window, resample_factor,
)

EIGHT_CONNECTED = np.ones((3, 3), bool)
ValueRange = tuple[float, float] | None  # non-8-bit data: what maps to 0-255 (None: each image's percentiles)
ANNOTATED_BYTES_PER_PIXEL = 40  # pixels, labels and their working copies while an annotated image is read


class AnnotationError(ValueError):
    """Annotations that are missing, unreadable or do not fit their image."""


@dataclass
class AnnotatedImage:
    """``labels``: int32 instance ids 1..n (0 background); ``classes[i]``: class of id ``i + 1``."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    class_names: list[str]
    resolution: float | None = None
    resolution_unit: str | None = None  # "um" or "m"
    ignore: np.ndarray | None = None  # where detections are neither right nor wrong (COCO's crowd regions)
    pixel_sides: tuple[float, float] | None = None  # (across, down) in resolution_unit; None: ``resolution`` both ways


# ---------------------------------------------------------------- files


def _require_file(path: Path) -> Path:
    """``path`` if it is a non-empty file."""
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    if path.stat().st_size == 0:
        raise AnnotationError(f"{path}: empty annotation file (0 bytes)")
    return path


def _read_image(path: Path, value_range: ValueRange = None) -> tuple[np.ndarray, RasterSource]:
    """All pixels as uint8 (h, w, 3) by the pipeline's own rules (non-8-bit data: ``value_range``
    to 0-255, else the image's percentiles), and the source describing them."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*scaled to 8 bits")
            source = open_raster(path, value_range=value_range)
        _check_fits_in_memory(path, source.height, source.width)
        pixels, _ = read_window(source, Span(0, source.height), Span(0, source.width))
    except SourceError as err:
        raise AnnotationError(str(err)) from err
    return pixels, source


def _check_fits_in_memory(path: Path, height: int, width: int) -> None:
    """Annotated images are read whole, with their labels (~40 bytes per pixel measured in
    ``dataset stats``, ``train`` and ``evaluate``): one that would take over half the free memory is
    refused before it is read, not killed by the kernel part way."""
    need, free = height * width * ANNOTATED_BYTES_PER_PIXEL, psutil.virtual_memory().available
    if need > free / 2:
        raise AnnotationError(
            f"{path}: {width}×{height} px; annotated images are read whole (~{need / 2**30:.1f} GiB with their labels) "
            f"and {free / 2**30:.1f} GiB is free: cut it into tiles first (e.g. gdal_retile.py)"
        )


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Colour bands of a mask image (alpha left out, nodata ignored) as (bands, h, w)."""
    _require_file(path)
    try:
        with opened(path) as dataset:
            bands = [i + 1 for i, c in enumerate(dataset.colorinterp) if c != ColorInterp.alpha] or [1]
            data = dataset.read(bands, masked=False)
            alpha = [i + 1 for i in range(dataset.count) if i + 1 not in bands]
            if alpha and not data.any() and len(np.unique(dataset.read(alpha[0], masked=False))) > 1:
                warnings.warn(f"{path}: the colour bands are empty and the alpha band holds shapes: masks are read "
                              "from the colour bands (save the mask without transparency)", stacklevel=4)
    except RasterioIOError as err:
        raise AnnotationError(f"{path}: not a readable mask image ({err})") from err
    if data.shape[1:] != shape:
        raise AnnotationError(f"{path}: mask is {data.shape[2]}×{data.shape[1]} px, its image is {shape[1]}×{shape[0]}")
    return data


def _pixel_sides(source: RasterSource) -> tuple[float, float] | None:
    """(across, down) metres of a georeferenced raster's pixels, else None."""
    return pixel_sides_m(source.crs_wkt, source.transform, source.width, source.height)


def at_resolution(sample: AnnotatedImage, resolution: float) -> AnnotatedImage:
    """``sample`` resampled to square pixels of ``resolution`` (in its own unit) by GDAL, axis by
    axis like the pipeline's reads: pixels bilinear, instance ids nearest (objects left without
    pixels are dropped). Returned unchanged within the pipeline's tolerance (``_resampled_shape``)."""
    shape = _resampled_shape(sample, resolution)
    if shape is None:
        return sample
    labels = _gdal_resize(sample.labels[None], shape, Resampling.nearest)[0]
    resampled = _sample(sample.name, pixels_at_resolution(sample, resolution), labels, sample.class_names,
                        (resolution, resolution), sample.classes, sample.resolution_unit)
    if sample.ignore is None:
        return resampled
    return replace(resampled, ignore=_gdal_resize(sample.ignore[None].astype(np.uint8), shape, Resampling.nearest)[0] > 0)


def pixels_at_resolution(sample: AnnotatedImage, resolution: float) -> np.ndarray:
    """``sample.image`` as ``at_resolution`` resamples it, without the labels."""
    shape = _resampled_shape(sample, resolution)
    if shape is None:
        return sample.image
    return np.ascontiguousarray(_gdal_resize(sample.image.transpose(2, 0, 1), shape, Resampling.bilinear).transpose(1, 2, 0))


def _resampled_shape(sample: AnnotatedImage, resolution: float) -> tuple[int, int] | None:
    """(height, width) of ``sample`` with each axis at ``resolution``, as ``sources.open_raster``
    sizes a raster for the model (an axis within the pipeline's tolerance kept); None when that
    is the shape it has, for then the pipeline reads it as is."""
    if sample.resolution is None:
        raise AnnotationError(f"{sample.name}: no pixel size (georeferencing or MicronsPerPixel) to resample from")
    across, down = (resample_factor(side, resolution) for side in sample.pixel_sides or (sample.resolution,) * 2)
    height, width = sample.labels.shape
    shape = max(1, round(height / down)), max(1, round(width / across))
    return None if shape == (height, width) else shape


def _gdal_resize(bands: np.ndarray, shape: tuple[int, int], resampling: Resampling) -> np.ndarray:
    """(count, h, w) bands resized to ``shape`` by GDAL, as a resampled window read does it."""
    count, height, width = bands.shape
    profile = dict(driver="GTiff", count=count, height=height, width=width, dtype=bands.dtype.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memory, memory.open(**profile) as dataset:
            dataset.write(bands)
            return dataset.read(out_shape=(count, *shape), resampling=resampling)


# ---------------------------------------------------------------- instances


def _sample(name: str, image: np.ndarray, labels: np.ndarray, class_names: list[str], sides: tuple[float, float] | None,
            classes=None, unit: str = "m", annotated: int | None = None) -> AnnotatedImage:
    """Drop ids without pixels and renumber 1..n; ``classes[k]`` belongs to input id ``k + 1``.
    Of ``annotated`` objects (default: one per entry of ``classes``), those dropped are counted
    in a warning. ``sides``: (across, down) size of a pixel, if known; ``resolution`` is the side
    of a square of equal area, as ``sources.pixel_size_m``."""
    ids, index = np.unique(labels, return_inverse=True)
    index = index.reshape(labels.shape)
    if ids[0] == 0:
        ids = ids[1:]
    else:
        index += 1
    annotated = len(classes) if annotated is None and classes is not None else annotated
    if annotated and len(ids) < annotated:
        warnings.warn(
            f"{name}: {annotated - len(ids)} of {annotated} annotated objects have no pixel of their own "
            "(outside the image, fewer than 3 points, too small, or covered by others): ignored", stacklevel=3,
        )
    classes = np.zeros(len(ids), np.int16) if classes is None else np.asarray(classes, np.int16)[ids - 1]
    resolution = None if sides is None else float(np.sqrt(sides[0] * sides[1]))
    return AnnotatedImage(name, image, index.astype(np.int32), classes, list(class_names), resolution,
                          unit if sides is not None else None, pixel_sides=sides)


def _polygonal(geometry):
    """The polygon parts of a geometry (lines and points left by repair or clipping dropped)."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    return shapely.union_all([p for p in shapely.get_parts(geometry) if p.geom_type in ("Polygon", "MultiPolygon")])


def _rasterise(geometries, shape: tuple[int, int], transform: Affine = Affine.identity()) -> np.ndarray:
    """Id ``k + 1`` for ``geometries[k]``, repaired and clipped to the image; larger drawn first."""
    frame = affinity.affine_transform(shapely.box(0, 0, shape[1], shape[0]), transform.to_shapely())
    clipped = shapely.intersection(shapely.make_valid(np.asarray(geometries, dtype=object)), frame)
    clipped = [_polygonal(g) for g in clipped]
    areas = shapely.area(clipped) if clipped else np.zeros(0)
    order = [int(k) for k in np.argsort(-areas, kind="stable") if areas[k] > 0]
    if not order:
        return np.zeros(shape, np.int32)
    shapes = [(clipped[k], k + 1) for k in order]
    return features.rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="int32")


def _colour_index(data: np.ndarray) -> np.ndarray:
    """Per pixel, an index 1..k of its value across all bands; 0 where every band is 0."""
    _, index = np.unique(data.reshape(len(data), -1).T, axis=0, return_inverse=True)
    index = index.reshape(data.shape[1:]) + 1
    index[(data == 0).all(0)] = 0
    return index


def _split_colours(colours: np.ndarray) -> np.ndarray:
    """4-connected components of each colour: a colour may be reused by objects that do not touch."""
    labels = np.zeros(colours.shape, np.int64)
    count = 0
    for colour, box in enumerate(ndimage.find_objects(colours), start=1):
        if box is None:
            continue
        parts, n = ndimage.label(colours[box] == colour)
        labels[box][parts > 0] = parts[parts > 0] + count
        count += n
    return labels


# ---------------------------------------------------------------- readers


def read_imagescope_xml(image_path: Path, xml_path: Path, class_name: str = "nucleus",
                        value_range: ValueRange = None) -> AnnotatedImage:
    """Aperio ImageScope XML (MoNuSeg): one ``Region`` per object, ``Vertex`` X/Y in pixels.

    Each ``Annotation`` layer is a class named by its ``Name`` (``class_name`` when it has none).
    Polygons, rectangles and ellipses (stored as two corners) are objects; negative regions
    (``NegativeROA="1"``) are holes cut from their layer's objects; rulers and arrows are skipped.
    """
    image, _ = _read_image(Path(image_path), value_range)
    polygons, layers, microns, regions = _imagescope_polygons(Path(xml_path), class_name)
    names = sorted(set(layers)) or [class_name]
    labels = _rasterise(polygons, image.shape[:2])
    sides = (microns, microns) if microns is not None else None
    return _sample(Path(image_path).stem, image, labels, names, sides, [names.index(n) for n in layers], unit="um",
                   annotated=regions)


IMAGESCOPE_ELLIPSE = "2"  # Region Type: 0 polygon, 1 rectangle, 2 ellipse (two corners), 3 arrow, 4 ruler


def imagescope_microns(path: Path) -> float | None:
    """The ``MicronsPerPixel`` an ImageScope XML records for its image, None when unknown."""
    try:
        return _microns_per_pixel(ET.parse(path).getroot())
    except (ET.ParseError, OSError, ValueError) as err:
        raise AnnotationError(f"{path}: no readable MicronsPerPixel ({err})") from err


def _microns_per_pixel(root: ET.Element) -> float | None:
    """``MicronsPerPixel`` of an ImageScope root; None when absent, 0 (ImageScope's unknown) or negative."""
    microns = float(root.get("MicronsPerPixel") or "nan")
    return microns if math.isfinite(microns) and microns > 0 else None


def _imagescope_polygons(path: Path, class_name: str) -> tuple[list, list[str], float | None, int]:
    """(the objects' polygons, each one's layer name, ``MicronsPerPixel`` or None: absent, 0 (how
    ImageScope records an unknown pixel size) or negative, the number of regions that are not
    negative)."""
    _require_file(path)
    objects, holes = [], defaultdict(list)
    try:
        root = ET.parse(path).getroot()
        for layer in root.iter("Annotation"):
            name = layer.get("Name") or class_name
            for region in layer.iter("Region"):
                ring = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
                if region.get("Type") == IMAGESCOPE_ELLIPSE and len(ring) == 2:
                    (x0, y0), (x1, y1) = ring
                    shape = affinity.scale(shapely.Point(0, 0).buffer(1, 32), abs(x1 - x0) / 2, abs(y1 - y0) / 2, origin=(0, 0))
                    shape = affinity.translate(shape, (x0 + x1) / 2, (y0 + y1) / 2)
                else:
                    shape = shapely.Polygon(ring) if len(ring) >= 3 else None
                if region.get("NegativeROA") == "1":
                    holes[name] += [shape] if shape is not None else []
                else:
                    objects.append((shape, name))
        microns = _microns_per_pixel(root)
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not well-formed ImageScope XML ({err})") from err
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{path}: a Vertex X/Y or MicronsPerPixel is not a number ({err})") from err
    kept = [(shape, name) for shape, name in objects if shape is not None]
    polygons = [shape if not holes[name] else shapely.difference(shapely.make_valid(shape), shapely.union_all(holes[name]))
                for shape, name in kept]
    return polygons, [name for _, name in kept], microns, len(objects)


def read_label_image(image_path: Path, mask_path: Path, class_name: str = "nucleus",
                     value_range: ValueRange = None) -> AnnotatedImage:
    """Instance label images. One band (DSB2018, Cellpose): each value is one instance.

    Several colour bands (BBBC039 RGBA PNG): a colour is reused for objects that do not touch, so
    instances are the 4-connected components of each colour.
    """
    image, source = _read_image(Path(image_path), value_range)
    data = _read_mask(Path(mask_path), image.shape[:2])
    if not np.issubdtype(data.dtype, np.integer):
        raise AnnotationError(f"{mask_path}: label images need integer values, found {data.dtype}")
    if (data == data[:1]).all():  # a grey label image saved as RGB: one band
        data = data[:1]
    colours = _colour_index(data)
    labels = _split_colours(colours) if len(data) > 1 else colours
    return _sample(Path(image_path).stem, image, labels, [class_name], _pixel_sides(source))


def read_binary_mask(image_path: Path, mask_path: Path, class_name: str = "object", min_area: int = 10,
                     value_range: ValueRange = None) -> AnnotatedImage:
    """Binary masks (any band > 0 is foreground): instances are the 8-connected components with at
    least ``min_area`` pixels. Touching objects merge: for SpaceNet this under-counts buildings."""
    image, source = _read_image(Path(image_path), value_range)
    foreground = (_read_mask(Path(mask_path), image.shape[:2]) > 0).any(0)
    labels, _ = ndimage.label(foreground, structure=EIGHT_CONNECTED)
    small = np.bincount(labels.ravel()) < min_area
    small[0] = False
    if small.any():
        warnings.warn(f"{Path(mask_path).name}: {int(small.sum())} component(s) under {min_area} px ignored", stacklevel=3)
    labels[small[labels]] = 0
    return _sample(Path(image_path).stem, image, labels, [class_name], _pixel_sides(source))


def read_coco(json_path: Path, image_dir: Path, value_range: ValueRange = None, only: set[str] | None = None) -> list[AnnotatedImage]:
    """COCO instances (polygons, RLE or uncompressed RLE); crowd regions (``iscrowd``) become the
    sample's ``ignore`` mask: not instances, and detections on them are not scored.

    ``class_names`` are the categories in id order. Images are ``image_dir / file_name``; with
    ``only``, just the images of those names are read.
    """
    json_path = Path(json_path)
    images, per_image, class_of, names = _load_coco(json_path)
    return [
        _coco_sample(entry, name, per_image[entry["id"]], class_of, names, Path(image_dir), json_path, value_range)
        for entry, name in zip(images, image_names([e["file_name"] for e in images])) if only is None or name in only
    ]


def coco_image_names(json_path: Path) -> list[str]:
    """The names ``read_coco`` gives the images of a COCO file, without reading them."""
    return image_names([e["file_name"] for e in _load_coco(Path(json_path))[0]])


def _crowd_mask(sample: AnnotatedImage, crowds: list[dict], json_path: Path) -> AnnotatedImage:
    """``sample`` with its crowd regions as the ``ignore`` mask."""
    if not crowds:
        return sample
    height, width = sample.labels.shape
    try:
        ignore = _paint_rles([_coco_rle(a["segmentation"], height, width) for a in crowds], (height, width)) > 0
    except (ValueError, TypeError, KeyError) as err:
        raise AnnotationError(f"{json_path}: a crowd region of {sample.name} is malformed ({err!r})") from err
    return replace(sample, ignore=ignore)


def image_names(file_names: list[str]) -> list[str]:
    """Each image's name (in split.json, --only, reports), unique: its stem; where another image
    has the same stem, its path without the suffix (``siteA/tile_0001``); where that is shared too
    (``x.png`` beside ``x.tif``), its whole path."""
    paths = [Path(f) for f in file_names]
    stems = Counter(p.stem for p in paths)
    bare = Counter(p.with_suffix("").as_posix() for p in paths)
    return [
        p.stem if stems[p.stem] == 1 else (p.with_suffix("") if bare[p.with_suffix("").as_posix()] == 1 else p).as_posix().lstrip("/")
        for p in paths
    ]


def _load_coco(path: Path) -> tuple[list[dict], dict, dict, list[str]]:
    """(image entries, annotations per image id, class index per category id, class names)."""
    _require_file(path)
    try:
        coco = json.loads(path.read_text())
        images, categories = coco["images"], sorted(coco["categories"], key=lambda c: c["id"])
        if not all("id" in e and "file_name" in e for e in images):
            raise KeyError("every image needs 'id' and 'file_name'")
        names = [str(c["name"]) for c in categories]
        per_image = defaultdict(list)
        for annotation in coco["annotations"]:
            per_image[annotation["image_id"]].append(annotation)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AnnotationError(f"{path}: not a COCO instances file ({err!r})") from err
    listed_twice = (
        ("category name", names), ("category id", [c["id"] for c in categories]),
        ("image file_name", [e["file_name"] for e in images]), ("image id", [e["id"] for e in images]),
    )
    for what, values in listed_twice:
        if repeated := sorted(v for v, n in Counter(values).items() if n > 1):
            raise AnnotationError(f"{path}: {what} listed more than once: {', '.join(map(str, repeated[:5]))}")
    listed = {e["id"] for e in images}
    if orphans := sum(len(v) for k, v in per_image.items() if k not in listed):
        warnings.warn(f"{path}: {orphans} annotation(s) refer to no listed image: ignored", stacklevel=3)
    return images, per_image, {c["id"]: k for k, c in enumerate(categories)}, names


def _coco_sample(entry: dict, name: str, annotations: list[dict], class_of: dict, names: list[str], image_dir: Path,
                 json_path: Path, value_range: ValueRange = None) -> AnnotatedImage:
    """One COCO image entry and its annotations, painted on the image's own size."""
    image, source = _read_image(image_dir / entry["file_name"], value_range)
    height, width = image.shape[:2]
    if (entry.get("height", height), entry.get("width", width)) != (height, width):
        raise AnnotationError(f"{json_path}: image {entry['file_name']} is listed as {entry.get('width')}×{entry.get('height')} px but is {width}×{height}")
    crowds, classes, rles, boxes = [], [], [], 0
    for annotation in annotations:
        if annotation.get("iscrowd", 0):
            crowds.append(annotation)
            continue
        where = f"{json_path}: annotation {annotation.get('id', '(no id)')} of {entry['file_name']}"
        if annotation.get("category_id") not in class_of:
            raise AnnotationError(f"{where}: category_id {annotation.get('category_id')!r} is not among the categories")
        if not annotation.get("segmentation"):  # a box alone (CVAT's rectangles)
            boxes += 1
            continue
        try:
            rles.append(_coco_rle(annotation["segmentation"], height, width))
        except (ValueError, TypeError, KeyError) as err:
            raise AnnotationError(f"{where}: segmentation is malformed ({err!r})") from err
        classes.append(class_of[annotation["category_id"]])
    if boxes:
        warnings.warn(f"{json_path}: {entry['file_name']}: {boxes} annotation(s) without a segmentation (a box alone) "
                      "ignored: Mask R-CNN learns and is scored on masks", stacklevel=3)
    try:
        labels = _paint_rles(rles, (height, width))  # decoding finds malformed RLE counts
    except (ValueError, TypeError) as err:
        raise AnnotationError(f"{json_path}: a segmentation of {entry['file_name']} is malformed ({err})") from err
    return _crowd_mask(_sample(name, image, labels, names, _pixel_sides(source), classes), crowds, json_path)


def _coco_rle(segmentation, height: int, width: int) -> dict | None:
    """Compressed RLE of a COCO segmentation; None for polygons with no ring of >= 3 points."""
    if isinstance(segmentation, list):
        if all(isinstance(v, (int, float)) for v in segmentation):  # one ring written flat, as some tools do
            segmentation = [segmentation]
        # rings of [x, y] pairs, as some tools write them: flattened to COCO's x, y, x, y, ...
        segmentation = [_flat_ring(ring) for ring in segmentation]
        if any(len(ring) % 2 for ring in segmentation):
            raise ValueError("a polygon has an odd number of coordinates")
        rings = [ring for ring in segmentation if len(ring) >= 6]  # 4 numbers would be read as a box
        return mask_utils.merge(mask_utils.frPyObjects(rings, height, width)) if rings else None
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"RLE size {segmentation['size']} differs from the image's {[height, width]}")
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"]}


def _flat_ring(ring: list) -> list:
    """A polygon ring as COCO's flat x, y, x, y, ... list, also when written as [x, y] pairs."""
    if ring and all(isinstance(v, (list, tuple)) for v in ring):
        if any(len(v) != 2 for v in ring):
            raise ValueError("a polygon's points must be numbers x, y, x, y, ... or [x, y] pairs")
        return [float(c) for point in ring for c in point]
    return ring


def _paint_rles(rles: list[dict | None], shape: tuple[int, int]) -> np.ndarray:
    """Id ``k + 1`` where ``rles[k]`` is set; larger masks painted first so smaller stay visible."""
    labels = np.zeros(shape, np.int32)
    areas = [float(mask_utils.area(r)) if r is not None else 0.0 for r in rles]
    for k in np.argsort(-np.asarray(areas), kind="stable"):
        if areas[k] > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
                labels[mask_utils.decode(rles[k]) > 0] = k + 1
    return labels


def read_vector(raster_path: Path, vector_path: Path, class_field: str | None = None,
                class_name: str = "object", value_range: ValueRange = None) -> AnnotatedImage:
    """A GeoTIFF and polygons (GeoPackage, GeoJSON, shapefile, …) in any CRS, reprojected to the
    raster's and rasterised on its grid. Classes: sorted distinct values of ``class_field``, else
    ``class_name``. Polygons without a CRS are taken to be in the raster's."""
    image, source = _read_image(Path(raster_path), value_range)
    frame = _read_polygons(Path(vector_path), source)
    if class_field is None:
        names, classes = [class_name], np.zeros(len(frame), np.int16)
    else:
        names, classes = _classes_from_field(frame, class_field, Path(vector_path))
    labels = _rasterise(frame.geometry.values, image.shape[:2], source.transform)
    return _sample(Path(raster_path).stem, image, labels, names, _pixel_sides(source), classes)


def _read_polygons(path: Path, source: RasterSource) -> gpd.GeoDataFrame:
    """Non-empty features of a vector file, in the raster's CRS."""
    _require_file(path)
    try:
        layers = pyogrio.list_layers(path)
        frame = gpd.read_file(path) if len(layers) == 1 else None
    except Exception as err:  # pyogrio raises DataSourceError and others
        raise AnnotationError(f"{path}: not a readable vector file ({err})") from err
    if frame is None:
        raise AnnotationError(f"{path}: {len(layers)} layers ({', '.join(layers[:6, 0])}): which holds the objects is "
                              "ambiguous; keep one layer per file (e.g. ogr2ogr out.gpkg in.gpkg LAYER)")
    if frame.crs is not None and source.crs_wkt is None:
        raise AnnotationError(f"{path}: polygons are in {frame.crs.to_string()} but {source.path} has no CRS to place them")
    if frame.crs is not None:
        frame = frame.to_crs(source.crs_wkt)
    geometry = frame.geometry.values
    return frame[~(shapely.is_missing(geometry) | shapely.is_empty(geometry))].reset_index(drop=True)


def _classes_from_field(frame: gpd.GeoDataFrame, field: str, path: Path) -> tuple[list[str], np.ndarray]:
    """(sorted distinct values as names, class index per feature)."""
    if field not in frame:
        raise AnnotationError(f"{path}: no attribute '{field}' (has {', '.join(map(str, frame.columns))})")
    values = frame[field]
    if values.isna().any():
        raise AnnotationError(f"{path}: {int(values.isna().sum())} features have no '{field}'")
    categories = sorted(values.unique())
    return [str(c) for c in categories], pd.Categorical(values, categories=categories).codes.astype(np.int16)


def with_common_classes(samples: list[AnnotatedImage]) -> list[AnnotatedImage]:
    """The samples with one class list: as it is when they all share one, else the sorted union of
    their names (files of a vector dataset may each hold only some of the classes)."""
    lists = {tuple(s.class_names) for s in samples}
    if len(lists) <= 1:
        return samples
    names = sorted({n for s in samples for n in s.class_names})
    index = {n: k for k, n in enumerate(names)}
    return [
        replace(s, classes=np.asarray([index[s.class_names[c]] for c in s.classes], np.int16), class_names=names)
        for s in samples
    ]


# ---------------------------------------------------------------- statistics


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {k: float(np.percentile(values, q)) for k, q in (("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100))}


def dataset_stats(samples: list[AnnotatedImage]) -> dict:
    """What to check before training: counts per class, balance, object sizes, density, pixel sizes.

    ``imbalanced`` when, with two or more classes, the largest has over 10× the instances of the
    smallest (a class without instances counts as 0). Sizes are in pixels; the equivalent
    diameter is that of a disc of the same area.
    """
    names = list(dict.fromkeys(n for s in samples for n in s.class_names))
    per_class = Counter({n: 0 for n in names})
    areas, pixels = [], 0
    for s in samples:
        per_class.update(s.class_names[c] for c in s.classes)
        counts = np.bincount(s.labels.ravel())[1:]
        areas.append(counts[counts > 0])
        pixels += s.labels.size
    areas = np.concatenate(areas) if areas else np.zeros(0, np.int64)
    total = int(areas.size)
    counts = [per_class[n] for n in names]
    return {
        "images": len(samples),
        "instances": total,
        "per_class": dict(per_class),
        "class_fraction": {n: per_class[n] / total if total else 0.0 for n in names},
        "imbalanced": len(names) > 1 and max(counts) > 10 * min(counts),
        "equivalent_diameter_px": _percentiles(2 * np.sqrt(areas / np.pi)),
        "area_px": _percentiles(areas),
        "instances_per_megapixel": total / (pixels / 1e6) if pixels else 0.0,
        "images_without_instances": [s.name for s in samples if not s.labels.any()],
        "resolution": _resolutions(samples),
    }


def _resolutions(samples: list[AnnotatedImage]) -> dict:
    """Pixel sizes per unit, and whether they differ by more than the pipeline's 5 %: then objects
    of one size appear at several sizes, and ``seamline train --resolution`` puts them on one scale."""
    units = sorted({s.resolution_unit for s in samples if s.resolution is not None})
    sizes = {u: [s.resolution for s in samples if s.resolution_unit == u] for u in units}
    return {
        "per_unit": {u: _percentiles(np.asarray(v)) for u, v in sizes.items()},
        "mixed": len(units) > 1 or any(max(v) > (1 + RESAMPLE_TOLERANCE) * min(v) for v in sizes.values()),
        "images_without": [s.name for s in samples if s.resolution is None],
    }
