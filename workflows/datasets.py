"""Annotated datasets on disk → lists of ``AnnotatedImage``: pairing files, formats, splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline import annotations
from pipeline.annotations import AnnotatedImage, AnnotationError
from workflows.formats import DatasetFormat

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt"}


def _images(images: Path) -> list[Path]:
    if images.is_file():
        return [images]
    found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise AnnotationError(f"{images}: no images found")
    stems = Counter(p.stem for p in found)
    if shared := sorted(p.name for p in found if stems[p.stem] > 1):
        raise AnnotationError(f"{images}: {', '.join(shared[:6])}: images of one name are paired with one annotation "
                              "file and scored under one name; keep one of each (or move the others to another folder)")
    return found


def _partner(image: Path, annotations_dir: Path, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        candidate = annotations_dir / f"{image.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise AnnotationError(f"{image}: no annotation named {image.stem}{{{','.join(suffixes)}}} in {annotations_dir}")


def load_dataset(
    fmt: DatasetFormat,
    images: Path,
    annotations_path: Path | None,
    class_name: str = "object",
    class_field: str | None = None,
    value_range: tuple[float, float] | None = None,
    only: set[str] | None = None,
) -> list[AnnotatedImage]:
    """Read every annotated image of a dataset, or with ``only`` those of these names (one that is
    not there is an error); non-8-bit pixels: ``value_range`` to 0-255, else each image's
    percentiles. Errors name the file and the problem."""
    if fmt == DatasetFormat.coco:
        if annotations_path is None:
            raise AnnotationError("coco needs --annotations INSTANCES.json")
        _check_names(annotations.coco_image_names(annotations_path), only)
        return annotations.read_coco(annotations_path, images, value_range, only)
    if annotations_path is None:
        raise AnnotationError(f"{fmt.value} needs --annotations (a folder of files named like the images)")
    found = _images(images)
    _check_names([p.stem for p in found], only)
    samples = []
    for image in (p for p in found if only is None or p.stem in only):
        if fmt == DatasetFormat.imagescope:
            samples.append(annotations.read_imagescope_xml(image, _partner(image, annotations_path, (".xml",)), class_name, value_range))
        elif fmt == DatasetFormat.label_images:
            mask = _partner(image, annotations_path, (".png", ".tif", ".tiff"))
            samples.append(annotations.read_label_image(image, mask, class_name, value_range))
        elif fmt == DatasetFormat.binary_masks:
            mask = _partner(image, annotations_path, (".png", ".tif", ".tiff"))
            samples.append(annotations.read_binary_mask(image, mask, class_name, value_range=value_range))
        else:
            vector = _partner(image, annotations_path, (".gpkg", ".geojson", ".json", ".shp"))
            samples.append(annotations.read_vector(image, vector, class_field=class_field, class_name=class_name, value_range=value_range))
    return annotations.with_common_classes(samples)


class UnknownImages(AnnotationError):
    """Images asked for by name that the dataset does not have."""


def _check_names(names: list[str], only: set[str] | None) -> None:
    if only and (unknown := only - set(names)):
        listed = f"{', '.join(names[:5])}{', …' if len(names) > 5 else ''}"
        raise UnknownImages(f"{', '.join(sorted(unknown))} not among the dataset's images ({listed})")


def split(samples: list[AnnotatedImage], every: int) -> tuple[list[AnnotatedImage], list[AnnotatedImage]]:
    """(train, validation): every ``every``-th image by sorted name (the 5th, 10th, …) is held out."""
    ordered = sorted(samples, key=lambda s: s.name)
    if every <= 0:
        return ordered, []
    held = [s for i, s in enumerate(ordered) if i % every == every - 1]
    return [s for i, s in enumerate(ordered) if i % every != every - 1], held
