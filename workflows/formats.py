"""The annotation formats that ``seamline dataset``, ``train`` and ``evaluate`` read."""

from enum import Enum


class DatasetFormat(str, Enum):
    imagescope = "imagescope"  # Aperio ImageScope XML per image (MoNuSeg, QuPath/ImageScope exports)
    label_images = "label-images"  # an instance label image per image (BBBC039, DSB2018, Cellpose)
    binary_masks = "binary-masks"  # a binary mask per image; instances = connected components
    coco = "coco"  # one COCO instances JSON (V7, CVAT, Labelbox exports)
    vector = "vector"  # a GeoTIFF per image + polygons (GeoPackage/GeoJSON/shapefile) in any CRS
