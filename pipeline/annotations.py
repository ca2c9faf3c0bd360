"""Annotation formats → ``AnnotatedImage`` (pixels + instance label image + classes).

Images are read through ``pipeline.sources`` so training and evaluation see exactly the pixels
inference sees (same band and 16-bit scaling rules). Every error names the file and the problem.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio import features
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from scipy import ndimage

from pipeline.grid import Span
from pipeline.sources import open_raster, read_window


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


def read_image(path: Path) -> np.ndarray:
    """All pixels of an image as uint8 (h, w, 3), by the pipeline's own rules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source = open_raster(path)
    return read_window(source, Span(0, source.height), Span(0, source.width))[0]


def _read_band(path: Path, band: int = 1) -> np.ndarray:
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as dataset:
                return dataset.read(band)
    except RasterioIOError as err:
        raise AnnotationError(f"{path}: not a readable mask image ({err})") from err


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n in order of first appearance value."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return lookup[labels]


def _sample(name, image, labels, class_names, resolution=None, path=None) -> AnnotatedImage:
    if image.shape[:2] != labels.shape:
        raise AnnotationError(f"{path or name}: annotations are {labels.shape[1]}×{labels.shape[0]}, image is {image.shape[1]}×{image.shape[0]}")
    labels = _relabel(labels.astype(np.int64)).astype(np.int32)
    return AnnotatedImage(name, image, labels, np.zeros(int(labels.max()), np.int16), class_names, resolution)


def rasterise(polygons: list, shape: tuple[int, int], transform=None) -> np.ndarray:
    """Instance ids 1..n for ``polygons`` in order; larger ones drawn first so smaller stay visible."""
    order = np.argsort(-shapely.area(np.asarray(polygons, dtype=object)), kind="stable") if polygons else []
    shapes = [(polygons[i], int(i) + 1) for i in order]
    if not shapes:
        return np.zeros(shape, np.int32)
    kwargs = {"transform": transform} if transform is not None else {}
    return features.rasterize(shapes, out_shape=shape, dtype="int32", **kwargs)


def read_imagescope_xml(image_path: Path, xml_path: Path, class_name: str = "nucleus") -> AnnotatedImage:
    """Aperio ImageScope XML (one ``Region`` per object, vertices in pixels); slivers skipped."""
    image = read_image(Path(image_path))
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise AnnotationError(f"{xml_path}: not readable ImageScope XML ({err})") from err
    frame = shapely.box(0, 0, image.shape[1], image.shape[0])
    polygons = []
    for region in root.iter("Region"):
        points = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(points) < 3:
            continue
        polygon = shapely.make_valid(shapely.Polygon(points)).intersection(frame)
        if polygon.area > 0:
            polygons.append(polygon)
    mpp = root.get("MicronsPerPixel")
    labels = rasterise(polygons, image.shape[:2])
    return _sample(Path(image_path).stem, image, labels, [class_name], float(mpp) if mpp else None, xml_path)


def read_label_image(image_path: Path, mask_path: Path, class_name: str = "nucleus") -> AnnotatedImage:
    """Instance label images; each value may hold several objects (BBBC039 reuses values for
    non-touching nuclei), so instances are the 4-connected components of each value."""
    image = read_image(Path(image_path))
    values = _read_band(Path(mask_path)).astype(np.int64)
    labels = np.zeros(values.shape, np.int64)
    offset = 0
    for value in np.unique(values[values > 0]):
        components, count = ndimage.label(values == value)
        labels[components > 0] = components[components > 0] + offset
        offset += count
    return _sample(Path(image_path).stem, image, labels, [class_name], path=mask_path)


def read_binary_mask(image_path: Path, mask_path: Path, class_name: str = "object", min_area: int = 10) -> AnnotatedImage:
    """Binary masks: instances are 4-connected components of at least ``min_area`` pixels
    (4-connectivity keeps objects that touch only at a corner apart)."""
    image = read_image(Path(image_path))
    components, _ = ndimage.label(_read_band(Path(mask_path)) > 0)
    areas = np.bincount(components.ravel())
    small = np.flatnonzero(areas < min_area)
    components[np.isin(components, small[small > 0])] = 0
    return _sample(Path(image_path).stem, image, components, [class_name], path=mask_path)


def read_coco(json_path: Path, image_dir: Path) -> list[AnnotatedImage]:
    """COCO instances (polygons or RLE); crowd regions skipped; classes in category-id order."""
    from pycocotools import mask as mask_utils

    try:
        coco = json.loads(Path(json_path).read_text())
        images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    except (OSError, ValueError, KeyError) as err:
        raise AnnotationError(f"{json_path}: not a COCO instances file ({err})") from err
    categories = sorted(categories, key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    names = [c["name"] for c in categories]
    samples = []
    for entry in images:
        image = read_image(Path(image_dir) / entry["file_name"])
        height, width = image.shape[:2]
        labels = np.zeros((height, width), np.int32)
        classes = []
        mine = [a for a in annotations if a["image_id"] == entry["id"] and not a.get("iscrowd", 0)]
        for a in sorted(mine, key=lambda a: -a.get("area", 0)):
            segmentation = a["segmentation"]
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            mask = mask_utils.decode(rle).astype(bool)
            if mask.any():
                classes.append(class_of[a["category_id"]])
                labels[mask] = len(classes)
        present = np.unique(labels[labels > 0])
        sample = _sample(Path(entry["file_name"]).stem, image, labels, names, path=json_path)
        sample.classes = np.asarray(classes, np.int16)[present - 1]
        samples.append(sample)
    return samples


def read_vector(raster_path: Path, vector_path: Path, class_field: str | None = None, class_name: str = "object") -> AnnotatedImage:
    """A GeoTIFF and polygons in any CRS (reprojected to the raster's), rasterised on its grid."""
    image = read_image(Path(raster_path))
    try:
        frame = gpd.read_file(vector_path)
    except Exception as err:  # pyogrio raises DataSourceError and others
        raise AnnotationError(f"{vector_path}: not a readable vector file ({err})") from err
    with rasterio.open(raster_path) as dataset:
        crs, transform = dataset.crs, dataset.transform
        resolution = abs(transform.a)
    if frame.crs is not None and crs is not None:
        frame = frame.to_crs(crs)
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty].reset_index(drop=True)
    if class_field is not None and class_field not in frame:
        raise AnnotationError(f"{vector_path}: no attribute '{class_field}' (has {', '.join(frame.columns)})")
    names = sorted(map(str, frame[class_field].unique())) if class_field else [class_name]
    labels = rasterise(list(frame.geometry.values), image.shape[:2], transform)
    present = np.unique(labels[labels > 0])
    sample = _sample(Path(raster_path).stem, image, labels, names, resolution, vector_path)
    if class_field:
        sample.classes = np.array([names.index(str(v)) for v in frame[class_field].values], np.int16)[present - 1]
    return sample


def dataset_stats(samples: list[AnnotatedImage]) -> dict:
    """What to check before training: counts per class, balance, object sizes, density."""
    names = samples[0].class_names if samples else []
    per_class = np.zeros(len(names), np.int64)
    areas, megapixels, empty = [], 0.0, []
    for s in samples:
        per_class += np.bincount(s.classes.astype(np.int64), minlength=len(names))
        counts = np.bincount(s.labels.ravel())[1:]
        areas.append(counts[counts > 0])
        megapixels += s.labels.size / 1e6
        if s.labels.max() == 0:
            empty.append(s.name)
    areas = np.concatenate(areas) if areas else np.zeros(0)
    diameters = 2 * np.sqrt(areas / np.pi)
    quantiles = lambda v: {k: float(np.percentile(v, q)) for k, q in [("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100)]} if len(v) else {}
    total = int(per_class.sum())
    nonzero = per_class[per_class > 0]
    return {
        "images": len(samples),
        "instances": total,
        "per_class": dict(zip(names, per_class.tolist())),
        "class_fraction": {n: (c / total if total else 0.0) for n, c in zip(names, per_class.tolist())},
        "imbalanced": bool(len(nonzero) > 1 and nonzero.max() > 10 * nonzero.min()) or len(nonzero) < len(names),
        "equivalent_diameter_px": quantiles(diameters),
        "area_px": quantiles(areas),
        "instances_per_megapixel": total / megapixels if megapixels else 0.0,
        "images_without_instances": empty,
    }
