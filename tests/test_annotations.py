import json

import numpy as np
import pytest
import rasterio
import shapely
from pycocotools import mask as mask_utils

from pipeline.annotations import (
    AnnotationError, dataset_stats, read_binary_mask, read_coco, read_imagescope_xml, read_label_image, read_vector,
)
from pipeline.synthetic_raster import write_geotiff


def image_file(tmp_path, h=40, w=50, name="img.tif"):
    return write_geotiff(np.full((h, w, 3), 120, np.uint8), tmp_path / name, crs=None)


def test_imagescope_xml(tmp_path):
    image = image_file(tmp_path)
    xml = tmp_path / "img.xml"
    xml.write_text(
        '<Annotations MicronsPerPixel="0.25"><Annotation><Regions>'
        '<Region Id="1"><Vertices><Vertex X="10" Y="10"/><Vertex X="20" Y="10"/><Vertex X="20" Y="20"/><Vertex X="10" Y="20"/></Vertices></Region>'
        '<Region Id="2"><Vertices><Vertex X="1" Y="1"/><Vertex X="5" Y="5"/></Vertices></Region>'
        '<Region Id="3"><Vertices><Vertex X="40" Y="30"/><Vertex X="60" Y="30"/><Vertex X="60" Y="45"/><Vertex X="40" Y="45"/></Vertices></Region>'
        "</Regions></Annotation></Annotations>"
    )
    sample = read_imagescope_xml(image, xml)
    assert sample.labels.max() == 2 and sample.resolution == 0.25
    areas = sorted(np.bincount(sample.labels.ravel())[1:].tolist())
    assert areas == [100, 100]  # the 10×10 square, and the other clipped to 10 × 10 inside the frame
    with pytest.raises(AnnotationError, match="broken.xml"):
        (tmp_path / "broken.xml").write_text("<Annotations>")
        read_imagescope_xml(image, tmp_path / "broken.xml")


def test_coco_polygons_rle_and_crowd(tmp_path):
    image_file(tmp_path, name="a.tif")
    rle_mask = np.zeros((40, 50), np.uint8, order="F")
    rle_mask[30:35, 5:15] = 1
    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": [{"id": 1, "file_name": "a.tif", "height": 40, "width": 50}],
        "categories": [{"id": 3, "name": "tree"}, {"id": 1, "name": "house"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle, "area": 50, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]], "area": 12, "iscrowd": 1},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (sample,) = read_coco(tmp_path / "coco.json", tmp_path)
    assert sample.class_names == ["house", "tree"]
    assert sample.labels.max() == 2
    by_class = {sample.class_names[c]: int((sample.labels == i + 1).sum()) for i, c in enumerate(sample.classes)}
    assert by_class["house"] == 50 and 100 <= by_class["tree"] <= 121


def test_vector_in_another_crs_lands_on_the_raster_grid(tmp_path):
    import geopandas as gpd
    from affine import Affine

    transform = Affine(0.5, 0, 430000, 0, -0.5, 5420000)
    raster = write_geotiff(np.zeros((100, 100, 3), np.uint8), tmp_path / "r.tif", crs="EPSG:32631", transform=transform)
    square = shapely.box(430010, 5419970, 430020, 5419980)  # columns 20–40, rows 40–60
    gpd.GeoDataFrame({"kind": ["hut"]}, geometry=[square], crs="EPSG:32631").to_crs("EPSG:4326").to_file(tmp_path / "v.geojson")
    sample = read_vector(raster, tmp_path / "v.geojson", class_field="kind")
    rows, cols = np.nonzero(sample.labels)
    assert abs(rows.min() - 40) <= 1 and abs(rows.max() - 59) <= 1 and abs(cols.min() - 20) <= 1 and abs(cols.max() - 39) <= 1
    assert sample.class_names == ["hut"] and sample.resolution == 0.5


def test_binary_mask_components(tmp_path):
    image = image_file(tmp_path)
    mask = np.zeros((40, 50, 1), np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:30, 20:25] = 255
    mask[35:37, 40:42] = 255  # 4 px: dropped
    sample = read_binary_mask(image, write_geotiff(mask, tmp_path / "m.tif", crs=None), min_area=10)
    assert sample.labels.max() == 2
    with pytest.raises(AnnotationError, match="absent.png"):
        read_binary_mask(image, tmp_path / "absent.png")


def test_real_datasets(shared_data):
    monuseg = shared_data / "nuclei-monuseg2018"
    he = read_imagescope_xml(monuseg / "images/TCGA-50-5931-01Z-00-DX1.tif", monuseg / "annotations/TCGA-50-5931-01Z-00-DX1.xml")
    assert he.labels.max() == 444 and he.resolution == pytest.approx(0.2468)  # 445 regions, one degenerate
    bbbc = shared_data / "nuclei-bbbc039"
    name = "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB"
    fluo = read_label_image(bbbc / f"images/{name}.tif", bbbc / f"masks/{name}.png")
    assert fluo.labels.max() == 110 and fluo.image.dtype == np.uint8 and fluo.image.shape == (520, 696, 3)
    rio = shared_data / "aerial-spacenet-rio-buildings"
    buildings = read_binary_mask(rio / "images/3band_013022223130_Public_img50.tif", rio / "masks/3band_013022223130_Public_img50.tif")
    assert buildings.labels.max() > 0
    stats = dataset_stats([he, fluo])
    assert stats["instances"] == 554 and stats["images"] == 2 and stats["images_without_instances"] == []
    assert 5 < stats["equivalent_diameter_px"]["median"] < 60
