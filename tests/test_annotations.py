import json
from dataclasses import replace

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.annotations import (
    AnnotatedImage, AnnotationError, at_resolution, dataset_stats, read_binary_mask, read_coco, read_imagescope_xml, read_label_image,
    read_vector,
)
from pipeline.synthetic_raster import write_geotiff

H, W = 40, 50


def image_file(tmp_path, name="img.tif", h=H, w=W):
    return write_geotiff(np.full((h, w, 3), 120, np.uint8), tmp_path / name, crs=None)


def areas(sample):
    return sorted(np.bincount(sample.labels.ravel())[1:].tolist())


def assert_well_formed(sample):
    n = int(sample.labels.max())
    assert sample.labels.dtype == np.int32 and sample.classes.dtype == np.int16 and len(sample.classes) == n
    assert set(np.unique(sample.labels)) - {0} == set(range(1, n + 1))  # ids 1..n, none empty
    assert sample.image.dtype == np.uint8 and sample.image.shape == (*sample.labels.shape, 3)


def region(*points):
    return "<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in points) + "</Vertices></Region>"


def imagescope(path, *regions, mpp="0.25"):
    path.write_text(f'<Annotations MicronsPerPixel="{mpp}"><Annotation><Regions>{"".join(regions)}</Regions></Annotation></Annotations>')
    return path


# ---------------------------------------------------------------- ImageScope XML


def test_imagescope_xml_slivers_overlaps_and_frame(tmp_path):
    xml = imagescope(
        tmp_path / "img.xml",
        region((10, 10), (20, 10), (20, 20), (10, 20)),  # 10×10 square: exactly rows/cols 10..19
        region((1, 1), (5, 5)),  # 2 vertices: skipped
        region((30, 10), (36, 10), (36, 16), (30, 16)),  # small square inside the next one, listed first
        region((25, 5), (45, 5), (45, 25), (25, 25)),  # 20×20, drawn first so the small one stays visible
        region((40, 30), (60, 30), (60, 45), (40, 45)),  # leaves the frame: clipped to 10×10
        region((60, 50), (70, 50), (70, 60)),  # entirely outside: dropped
        region((2, 30), (2.4, 30), (2.4, 30.4)),  # covers no pixel centre: dropped, ids stay consecutive
    )
    sample = read_imagescope_xml(image_file(tmp_path), xml)
    assert_well_formed(sample)
    assert sample.labels.max() == 4 and sample.resolution == 0.25 and sample.class_names == ["nucleus"]
    assert areas(sample) == [36, 100, 100, 400 - 36]
    square = sample.labels[10, 10]
    assert (sample.labels[10:20, 10:20] == square).all() and (sample.labels == square).sum() == 100
    assert (sample.labels[10:16, 30:36] != sample.labels[5, 25]).all()  # small one on top of the large one


def test_imagescope_layers_are_classes_negative_regions_holes_and_ellipses_objects(tmp_path):
    def layer(name, *regions):
        return f'<Annotation Name="{name}"><Regions>{"".join(regions)}</Regions></Annotation>'

    hole = region((14, 14), (16, 14), (16, 16), (14, 16)).replace("<Region>", '<Region NegativeROA="1">')
    ellipse = region((30, 26), (40, 32)).replace("<Region>", '<Region Type="2">')  # two corners of its box
    ruler = region((40, 2), (48, 2)).replace("<Region>", '<Region Type="4">')
    (tmp_path / "a.xml").write_text(
        '<Annotations MicronsPerPixel="0.5">'
        + layer("tumor", region((10, 10), (20, 10), (20, 20), (10, 20)), hole, region((2, 30), (8, 30), (8, 36), (2, 36)))
        + layer("lymphocyte", ellipse, ruler) + layer("", region((40, 10), (44, 10), (44, 14), (40, 14)))
        + "</Annotations>"
    )
    with pytest.warns(UserWarning, match="1 of 5 annotated objects have no pixel"):  # the ruler
        sample = read_imagescope_xml(image_file(tmp_path), tmp_path / "a.xml", class_name="nucleus")
    assert_well_formed(sample)
    assert sample.class_names == ["lymphocyte", "nucleus", "tumor"]
    named = sorted((sample.class_names[c], int((sample.labels == i + 1).sum())) for i, c in enumerate(sample.classes))
    assert named[0][0] == "lymphocyte" and abs(named[0][1] - np.pi * 5 * 3) < 6  # the ellipse: 10 × 6 px box
    assert named[1:] == [("nucleus", 16), ("tumor", 36), ("tumor", 100 - 4)]  # the hole cut from its square
    assert sample.labels[15, 15] == 0 and sample.labels[12, 12] > 0


def test_imagescope_self_intersecting_region_is_repaired(tmp_path):
    bow_tie = region((0, 0), (20, 20), (20, 0), (0, 20))  # two triangles meeting at (10, 10)
    sample = read_imagescope_xml(image_file(tmp_path), imagescope(tmp_path / "a.xml", bow_tie, mpp=""))
    assert sample.labels.max() == 1 and 150 <= areas(sample)[0] <= 210 and sample.resolution is None


def test_imagescope_errors_name_the_file(tmp_path):
    image = image_file(tmp_path)
    (tmp_path / "broken.xml").write_text("<Annotations>")
    with pytest.raises(AnnotationError, match="broken.xml"):
        read_imagescope_xml(image, tmp_path / "broken.xml")
    with pytest.raises(AnnotationError, match="absent.xml.*not found"):
        read_imagescope_xml(image, tmp_path / "absent.xml")
    with pytest.raises(AnnotationError, match="nan.xml.*not a number"):
        read_imagescope_xml(image, imagescope(tmp_path / "nan.xml", '<Region><Vertices><Vertex X="a" Y="1"/></Vertices></Region>'))
    with pytest.raises(AnnotationError, match="missing.tif"):
        read_imagescope_xml(tmp_path / "missing.tif", imagescope(tmp_path / "ok.xml"))
    square = region((5, 5), (15, 5), (15, 15), (5, 15))
    with pytest.warns(UserWarning, match="img: 2 of 3 annotated objects have no pixel of their own"):
        read_imagescope_xml(image, imagescope(tmp_path / "some.xml", square, region((1, 1), (3, 3)), region((90, 90), (95, 90), (95, 95))))
    for mpp in ("0", "-0.25", "inf"):  # ImageScope writes 0 for an unknown pixel size
        assert read_imagescope_xml(image, imagescope(tmp_path / "unknown.xml", square, mpp=mpp)).resolution is None


# ---------------------------------------------------------------- COCO


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def uncompressed_rle_of(mask):
    flat = mask.ravel(order="F").astype(np.int8)
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size])
    return {"size": list(mask.shape), "counts": (np.r_[0, runs] if flat[0] else runs).tolist()}


def rle_area(polygon) -> int:
    return int(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))))


def coco_file(tmp_path, annotations, images=None):
    image_file(tmp_path, "a.tif")
    image_file(tmp_path, "b.tif")
    coco = {
        "images": images or [{"id": 1, "file_name": "a.tif", "height": H, "width": W}, {"id": 2, "file_name": "b.tif"}],
        "categories": [{"id": 3, "name": "tree"}, {"id": 1, "name": "house"}],
        "annotations": [{"id": i + 1, "image_id": 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return tmp_path / "coco.json"


def test_coco_polygons_rle_and_crowd(tmp_path):
    house = np.zeros((H, W), bool)
    house[30:35, 5:15] = True  # 50 px
    shed = np.zeros((H, W), bool)
    shed[12:15, 12:16] = True  # 12 px inside the tree polygon: stays visible on top
    path = coco_file(tmp_path, [
        {"category_id": 3, "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]]},  # 100 px
        {"category_id": 1, "segmentation": rle_of(house)},
        {"category_id": 1, "segmentation": uncompressed_rle_of(shed)},
        {"category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]], "iscrowd": 1},
        {"category_id": 3, "segmentation": [[40, 2, 45, 8]]},  # 2 points: no area (not a box)
    ])
    a, b = read_coco(path, tmp_path)
    assert_well_formed(a)
    assert a.name == "a" and a.class_names == ["house", "tree"]
    assert a.labels.max() == 3 and not b.labels.any() and len(b.classes) == 0
    pixels = {(a.class_names[c], int((a.labels == i + 1).sum())) for i, c in enumerate(a.classes)}
    assert pixels == {("tree", 100 - 12), ("house", 50), ("house", 12)}
    assert (a.labels[30:35, 5:15] == a.labels[30, 5]).all()
    assert a.ignore is not None and b.ignore is None  # the crowd region: neither an instance nor background
    assert a.ignore.sum() == rle_area([[0, 0, 5, 0, 5, 5]]) and a.ignore[1, 3] and not a.ignore[20:].any()


def test_coco_errors(tmp_path):
    with pytest.raises(AnnotationError, match="coco.json: annotation 1 of a.tif: category_id 7 is not among the categories"):
        read_coco(coco_file(tmp_path, [{"category_id": 7, "segmentation": [[1, 1, 9, 1, 9, 9]]}]), tmp_path)
    with pytest.raises(AnnotationError, match="annotation 2 of a.tif: segmentation is malformed .*odd number of coordinates"):
        read_coco(coco_file(tmp_path, [{"category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]},
                                       {"category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9, 4]]}]), tmp_path)
    boxes = [{"category_id": 1, "segmentation": [], "bbox": [1, 1, 5, 5]}, {"category_id": 1, "bbox": [9, 9, 5, 5]},
             {"category_id": 3, "segmentation": [1, 1, 9, 1, 9, 9]}]  # the last: one ring written flat
    with pytest.warns(UserWarning, match="a.tif: 2 annotation.s. without a segmentation .a box alone. ignored"):
        a, _ = read_coco(coco_file(tmp_path, boxes), tmp_path)
    assert a.labels.max() == 1 and a.class_names[a.classes[0]] == "tree"
    wrong_size = [{"id": 1, "file_name": "a.tif", "height": 30, "width": W}]
    with pytest.raises(AnnotationError, match="a.tif.*listed as"):
        read_coco(coco_file(tmp_path, [], images=wrong_size), tmp_path)
    with pytest.raises(AnnotationError, match="missing.tif"):
        read_coco(coco_file(tmp_path, [], images=[{"id": 1, "file_name": "missing.tif"}]), tmp_path)
    garbled = {"category_id": 1, "segmentation": {"size": [H, W], "counts": "zz~~not-an-rle"}}
    with pytest.raises(AnnotationError, match="coco.json: a segmentation of a.tif is malformed"):
        read_coco(coco_file(tmp_path, [garbled]), tmp_path)
    twice = [{"id": 1, "file_name": "a.tif"}, {"id": 2, "file_name": "a.tif"}]
    with pytest.raises(AnnotationError, match="coco.json: image file_name listed more than once: a.tif"):
        read_coco(coco_file(tmp_path, [], images=twice), tmp_path)
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    orphan = {"category_id": 1, "segmentation": square, "image_id": 9}
    with pytest.warns(UserWarning, match="coco.json: 1 annotation.s. refer to no listed image"):
        read_coco(coco_file(tmp_path, [orphan]), tmp_path)
    degenerate = {"category_id": 1, "segmentation": [[1, 1, 5, 5]]}  # two points
    with pytest.warns(UserWarning, match="a: 1 of 2 annotated objects have no pixel of their own"):
        read_coco(coco_file(tmp_path, [{"category_id": 1, "segmentation": square}, degenerate]), tmp_path)
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(AnnotationError, match="bad.json.*not a COCO"):
        read_coco(tmp_path / "bad.json", tmp_path)


def test_coco_ids_listed_twice_are_refused_and_points_as_pairs_read(tmp_path):
    images = [{"id": 1, "file_name": "a.tif"}, {"id": 1, "file_name": "b.tif"}]  # two exports merged
    with pytest.raises(AnnotationError, match="coco.json: image id listed more than once: 1"):
        read_coco(coco_file(tmp_path, [], images=images), tmp_path)
    path = coco_file(tmp_path, [])
    coco = json.loads(path.read_text())
    coco["categories"].append({"id": 3, "name": "shed"})
    path.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match="coco.json: category id listed more than once: 3"):
        read_coco(path, tmp_path)
    quad = [[[10, 10], [20, 10], [20, 20], [10, 20]]]  # points as [x, y] pairs, as some tools write them
    hexagon = [[[30, 30], [34, 30], [36, 34], [34, 38], [30, 38], [28, 34]]]
    a, _ = read_coco(coco_file(tmp_path, [{"category_id": 3, "segmentation": quad}, {"category_id": 1, "segmentation": hexagon}]), tmp_path)
    assert areas(a) == sorted([100, rle_area([sum(hexagon[0], [])])])
    with pytest.raises(AnnotationError, match=r"\[x, y\] pairs"):
        read_coco(coco_file(tmp_path, [{"category_id": 3, "segmentation": [[[1, 1, 1], [5, 1, 1], [5, 5, 1]]]}]), tmp_path)


def test_coco_images_of_one_stem_in_one_folder_keep_apart(tmp_path):
    images = [{"id": 1, "file_name": "a.tif"}, {"id": 2, "file_name": "b.tif"}]
    path = coco_file(tmp_path, [{"category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12]]}], images=images)
    (tmp_path / "a.png").write_bytes((tmp_path / "b.tif").read_bytes())  # PNG in name, GeoTIFF within: read either way
    coco = json.loads(path.read_text())
    coco["images"][1]["file_name"] = "a.png"
    path.write_text(json.dumps(coco))
    samples = read_coco(path, tmp_path)
    assert [s.name for s in samples] == ["a.tif", "a.png"] and [int(s.labels.max()) for s in samples] == [1, 0]


# ---------------------------------------------------------------- vector


def test_coco_images_of_one_name_in_two_folders_keep_apart(tmp_path):
    """CVAT / Labelbox exports put tasks in folders with repeated file names: the names that
    identify images (split.json, --only, reports) are then their paths."""
    for folder in ("siteA", "siteB"):
        (tmp_path / folder).mkdir()
        image_file(tmp_path / folder, "tile.tif")
    image_file(tmp_path, "other.tif")
    coco = {
        "images": [{"id": 1, "file_name": "siteA/tile.tif"}, {"id": 2, "file_name": "siteB/tile.tif"}, {"id": 3, "file_name": "other.tif"}],
        "categories": [{"id": 1, "name": "house"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12]]}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    samples = read_coco(tmp_path / "coco.json", tmp_path)
    assert [s.name for s in samples] == ["siteA/tile", "siteB/tile", "other"]
    assert [int(s.labels.max()) for s in samples] == [0, 1, 0]


def test_vector_in_another_crs_lands_on_the_raster_grid(tmp_path):
    transform = Affine(0.5, 0, 430000, 0, -0.5, 5420000)
    raster = write_geotiff(np.zeros((100, 100, 3), np.uint8), tmp_path / "r.tif", crs="EPSG:32631", transform=transform)
    hut = shapely.box(430010, 5419970, 430020, 5419980)  # columns 20..39, rows 40..59
    barn = shapely.box(430045, 5419995, 430060, 5420010)  # half outside the raster: columns 90..99, rows 0..9
    frame = gpd.GeoDataFrame({"kind": ["hut", "barn"]}, geometry=[hut, barn], crs="EPSG:32631")
    frame.to_crs("EPSG:4326").to_file(tmp_path / "v.geojson")
    frame.to_crs("EPSG:3857").to_file(tmp_path / "v.gpkg")
    for vector in ("v.geojson", "v.gpkg"):
        sample = read_vector(raster, tmp_path / vector, class_field="kind")
        assert_well_formed(sample)
        assert sample.class_names == ["barn", "hut"] and sample.resolution == pytest.approx(0.5, rel=1e-3)  # ground metres: UTM scale 0.99966 here
        for i, c in enumerate(sample.classes):
            rows, cols = np.nonzero(sample.labels == i + 1)
            expected = {"hut": (40, 59, 20, 39), "barn": (0, 9, 90, 99)}[sample.class_names[c]]
            assert np.allclose((rows.min(), rows.max(), cols.min(), cols.max()), expected, atol=1)


def test_vector_files_holding_different_classes_share_one_class_list(tmp_path):
    from workflows.datasets import DatasetFormat, load_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "vectors").mkdir()
    layouts = {"a": {"shed": shapely.box(2, -8, 6, -4)}, "b": {"tower": shapely.box(1, -9, 4, -6), "barn": shapely.box(5, -5, 9, -1)}}
    for name, objects in layouts.items():
        write_geotiff(np.zeros((10, 10, 3), np.uint8), tmp_path / "images" / f"{name}.tif", crs="EPSG:32631",
                      transform=Affine(1, 0, 0, 0, -1, 0))
        gpd.GeoDataFrame({"kind": list(objects)}, geometry=list(objects.values()), crs="EPSG:32631").to_file(tmp_path / "vectors" / f"{name}.gpkg")
    samples = load_dataset(DatasetFormat.vector, tmp_path / "images", tmp_path / "vectors", class_field="kind")
    assert [s.class_names for s in samples] == [["barn", "shed", "tower"]] * 2
    for sample in samples:
        assert_well_formed(sample)
        for i, c in enumerate(sample.classes):
            rows, cols = np.nonzero(sample.labels == i + 1)
            box = layouts[sample.name][sample.class_names[c]].bounds  # x0, y0, x1, y1 with y = -row
            assert (cols.min(), cols.max() + 1, -rows.max() - 1, -rows.min()) == (box[0], box[2], box[1], box[3])


def test_vector_errors(tmp_path):
    raster = write_geotiff(np.zeros((20, 20, 3), np.uint8), tmp_path / "r.tif", crs="EPSG:32631")
    gpd.GeoDataFrame({"kind": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:32631").to_file(tmp_path / "v.gpkg")
    with pytest.raises(AnnotationError, match="v.gpkg.*no attribute 'class'"):
        read_vector(raster, tmp_path / "v.gpkg", class_field="class")
    with pytest.raises(AnnotationError, match="no CRS"):
        read_vector(image_file(tmp_path), tmp_path / "v.gpkg")
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:32631").to_file(tmp_path / "v.gpkg", layer="roads")
    with pytest.raises(AnnotationError, match="v.gpkg: 2 layers .*roads.*keep one layer per file"):
        read_vector(raster, tmp_path / "v.gpkg")
    (tmp_path / "junk.geojson").write_text("{not json")
    with pytest.raises(AnnotationError, match="junk.geojson"):
        read_vector(raster, tmp_path / "junk.geojson")


# ---------------------------------------------------------------- masks


def test_binary_mask_components(tmp_path):
    image = image_file(tmp_path)
    mask = np.zeros((H, W, 1), np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:30, 20:25] = 255
    mask[30:35, 25:30] = 255  # touches the previous blob only at a corner: 8-connected, merged
    mask[35:37, 40:42] = 255  # 4 px: dropped
    with pytest.warns(UserWarning, match="m.tif: 1 component.s. under 10 px ignored"):
        sample = read_binary_mask(image, write_geotiff(mask, tmp_path / "m.tif", crs=None), min_area=10)
    assert_well_formed(sample)
    assert areas(sample) == [64, 75] and sample.resolution is None
    assert read_binary_mask(image, tmp_path / "m.tif", min_area=1).labels.max() == 3
    with pytest.raises(AnnotationError, match="absent.png.*not found"):
        read_binary_mask(image, tmp_path / "absent.png")
    with pytest.raises(AnnotationError, match="small.tif.*20×10 px"):
        read_binary_mask(image, write_geotiff(mask[:10, :20], tmp_path / "small.tif", crs=None))
    drawn_in_alpha = np.zeros((H, W, 4), np.uint8)
    drawn_in_alpha[2:10, 2:10, 3] = 255
    Image.fromarray(drawn_in_alpha, "RGBA").save(tmp_path / "alpha.png")
    with pytest.warns(UserWarning, match="alpha.png: the colour bands are empty and the alpha band holds shapes"):
        assert not read_binary_mask(image, tmp_path / "alpha.png").labels.any()


def test_label_image_values_are_instances(tmp_path):
    labels = np.zeros((H, W, 1), np.uint16)
    labels[0:5, 0:5] = 300
    labels[5:10, 5:10] = 300  # diagonal piece of the same instance: stays one instance
    labels[20:30, 20:30] = 7
    labels[20:30, 30:35] = 9  # touches 7: a separate instance
    sample = read_label_image(image_file(tmp_path), write_geotiff(labels, tmp_path / "l.tif", crs=None), "cell")
    assert_well_formed(sample)
    assert areas(sample) == [50, 50, 100] and sample.class_names == ["cell"]
    assert sample.labels[0, 0] == sample.labels[9, 9]
    as_rgb = read_label_image(image_file(tmp_path), write_geotiff(np.repeat(labels, 3, axis=2), tmp_path / "rgb.tif", crs=None))
    assert (as_rgb.labels == sample.labels).all()  # a grey label image saved as RGB: the same instances
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(AnnotationError, match="corrupt.png"):
        read_label_image(image_file(tmp_path), tmp_path / "corrupt.png")
    with pytest.raises(AnnotationError, match="f.tif.*integer"):
        read_label_image(image_file(tmp_path), write_geotiff(labels.astype(np.float32), tmp_path / "f.tif", crs=None))


def test_colour_coded_mask_reuses_colours(tmp_path):
    """BBBC039 PNGs: RGBA, the value in red is reused by nuclei that do not touch."""
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:8, 2:8, 0] = 1
    rgba[20:26, 30:36, 0] = 1  # same colour, elsewhere: another nucleus
    rgba[20:26, 36:40, 0] = 2  # touches the previous one: different colour
    rgba[30:33, 2:6, :3] = (1, 0, 5)  # a colour differing only in blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    sample = read_label_image(image_file(tmp_path), tmp_path / "m.png")
    assert_well_formed(sample)
    assert sample.labels.max() == 4 and areas(sample) == [12, 24, 36, 36]


def test_a_dataset_folder_with_two_images_of_one_name_is_refused(tmp_path):
    from workflows.datasets import DatasetFormat, load_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image_file(tmp_path / "images", "x.tif")
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(tmp_path / "images" / "x.png")
    write_geotiff(np.ones((H, W, 1), np.uint8), tmp_path / "masks" / "x.tif", crs=None)
    with pytest.raises(AnnotationError, match="images: x.png, x.tif: images of one name are paired with one annotation file"):
        load_dataset(DatasetFormat.binary_masks, tmp_path / "images", tmp_path / "masks")


def test_only_the_images_asked_for_are_read(tmp_path):
    """``evaluate --only`` scores a split: the other images are not read (one may be broken, or huge)."""
    from workflows.datasets import DatasetFormat, load_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image_file(tmp_path / "images", "good.tif")
    (tmp_path / "images" / "broken.tif").write_bytes(b"II*\x00 not really a TIFF")
    for name in ("good", "broken"):
        write_geotiff(np.ones((H, W, 1), np.uint8), tmp_path / "masks" / f"{name}.tif", crs=None)
    samples = load_dataset(DatasetFormat.binary_masks, tmp_path / "images", tmp_path / "masks", only={"good"})
    assert [s.name for s in samples] == ["good"]
    with pytest.raises(AnnotationError, match=r"nope not among the dataset's images \(broken, good\)"):
        load_dataset(DatasetFormat.binary_masks, tmp_path / "images", tmp_path / "masks", only={"good", "nope"})
    with pytest.raises(AnnotationError, match="broken.tif"):
        load_dataset(DatasetFormat.binary_masks, tmp_path / "images", tmp_path / "masks")
    path = coco_file(tmp_path, [{"category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12]]}],
                     images=[{"id": 1, "file_name": "a.tif"}, {"id": 2, "file_name": "gone.tif"}])
    assert [s.name for s in load_dataset(DatasetFormat.coco, tmp_path, path, only={"a"})] == ["a"]


# ---------------------------------------------------------------- statistics


def sample_with(areas_px, classes, class_names, name="s", shape=(100, 100)):
    labels = np.zeros(shape, np.int32)
    flat = labels.reshape(-1)
    start = 0
    for i, area in enumerate(areas_px):
        flat[start : start + area] = i + 1
        start += area + 1
    return AnnotatedImage(name, np.zeros((*shape, 3), np.uint8), labels, np.asarray(classes, np.int16), class_names)


def test_dataset_stats():
    names = ["big", "rare"]
    samples = [
        sample_with([100] * 11, [0] * 11, names, "a"),
        sample_with([4], [1], names, "b"),
        sample_with([], [], names, "empty"),
    ]
    stats = dataset_stats(samples)
    assert stats["images"] == 3 and stats["instances"] == 12
    assert stats["per_class"] == {"big": 11, "rare": 1} and stats["imbalanced"]
    assert stats["class_fraction"]["rare"] == pytest.approx(1 / 12)
    assert stats["area_px"]["min"] == 4 and stats["area_px"]["max"] == 100 and stats["area_px"]["median"] == 100
    assert stats["equivalent_diameter_px"]["median"] == pytest.approx(2 * np.sqrt(100 / np.pi))
    assert stats["instances_per_megapixel"] == pytest.approx(12 / 0.03)
    assert stats["images_without_instances"] == ["empty"]
    assert not dataset_stats(samples[:1] + [sample_with([4] * 2, [1, 1], names)])["imbalanced"]
    assert stats["resolution"] == {"per_unit": {}, "mixed": False, "images_without": ["a", "b", "empty"]}
    samples[0].resolution, samples[0].resolution_unit = 0.25, "um"
    samples[1].resolution, samples[1].resolution_unit = 0.26, "um"
    resolution = dataset_stats(samples)["resolution"]
    assert resolution["per_unit"]["um"]["min"] == 0.25 and resolution["per_unit"]["um"]["max"] == 0.26
    assert not resolution["mixed"] and resolution["images_without"] == ["empty"]
    samples[1].resolution = 0.5  # a 20× scan among 40× ones
    assert dataset_stats(samples)["resolution"]["mixed"]


# ---------------------------------------------------------------- real data


def provenance_count(folder, name, column):
    """A number from the PROVENANCE.md table row of ``name``, by column header."""
    header = None
    for line in (folder / "PROVENANCE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column in cells:
            header = cells
        elif header and cells[0] == name:
            return int(cells[header.index(column)])
    raise LookupError(f"{name} not in {folder / 'PROVENANCE.md'}")


def test_real_datasets(shared_data):
    monuseg = shared_data / "nuclei-monuseg2018"
    tile = "TCGA-50-5931-01Z-00-DX1"
    he = read_imagescope_xml(monuseg / f"images/{tile}.tif", monuseg / f"annotations/{tile}.xml")
    valid = provenance_count(monuseg, tile, "nuclei") - provenance_count(monuseg, tile, "degenerate")  # 445 - 1 (Region 180 has 2 vertices)
    assert_well_formed(he)
    assert valid - 3 <= he.labels.max() <= valid and he.resolution == pytest.approx(0.2468)

    bbbc = shared_data / "nuclei-bbbc039"
    fluo = []
    for name in ("IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42CB", "IXMtest_J07_s9_w16921AB3C-1E9C-41C5-ADDA-7DE5CBF9CCBB",
                 "IXMtest_P23_s7_w13B627CB9-6C57-4049-AAD7-6468A051DD24"):
        sample = read_label_image(bbbc / f"images/{name}.tif", bbbc / f"masks/{name}.png")
        assert_well_formed(sample)
        assert sample.labels.max() == provenance_count(bbbc, name, "nuclei") and sample.image.shape == (520, 696, 3)
        assert sample.image.max() > 200  # 12-bit data stretched per image
        fluo.append(sample)

    dsb = shared_data / "nuclei-stardist-dsb2018-sample"
    kaggle = read_label_image(dsb / "img2d.tif", dsb / "mask2d.tif")
    assert kaggle.labels.max() == 125  # label 129 has a diagonal-only 2 px piece: still one instance

    rio = shared_data / "aerial-spacenet-rio-buildings"
    chip = "3band_013022223130_Public_img50.tif"
    buildings = read_binary_mask(rio / f"images/{chip}", rio / f"masks/{chip}")
    assert 0 < buildings.labels.max() <= 11  # PROVENANCE: 11 4-connected components; 8-connected can only merge
    assert 0.4 < buildings.resolution < 0.55  # lon/lat chip, ~0.5 m pixels
    blank = "3band_013022223130_Public_img58.tif"
    nodata = read_binary_mask(rio / f"images/{blank}", rio / f"masks/{blank}")

    forest = shared_data / "aerial-deepforest-samples"
    trees = read_coco(forest / "coco_sample_file.json", forest)
    assert [s.labels.max() for s in trees] == [1, 5] and trees[0].class_names == ["tree"]
    crown = read_vector(forest / "australia.tif", forest / "australia.shp", class_name="tree")
    assert crown.labels.max() == 1 and (crown.labels > 0).sum() == pytest.approx(40.2457 / 0.018**2, rel=0.05)

    samples = [he, *fluo, kaggle, buildings, nodata, *trees, crown]
    stats = dataset_stats(samples)
    total = sum(int(s.labels.max()) for s in samples)
    assert stats["images"] == len(samples) and stats["instances"] == total == sum(stats["per_class"].values())
    assert stats["images_without_instances"] == [nodata.name]
    assert 5 < stats["equivalent_diameter_px"]["median"] < 60


def test_resampled_samples_match_the_pipelines_resampled_reads(tmp_path):
    from pipeline.grid import Span
    from pipeline.sources import open_raster

    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[20:60, 30:90] = mask[100:180, 200:260] = mask[250:252, 10:12] = 255  # the last: 4 px
    transform = Affine(0.5, 0, 430000, 0, -0.5, 5420000)
    path = write_geotiff(image, tmp_path / "img.tif", transform=transform)
    sample = read_binary_mask(path, write_geotiff(mask[..., None], tmp_path / "mask.tif", transform=transform), min_area=1)
    assert (sample.resolution, sample.resolution_unit, sample.labels.max()) == (pytest.approx(0.5, rel=1e-3), "m", 3)  # ground m: UTM scale

    coarse = at_resolution(sample, 1.0)
    source = open_raster(path, target_m=1.0)  # what inference reads for a 1 m model
    pixels, _ = source.read(Span(0, source.height), Span(0, source.width))
    assert coarse.image.shape == pixels.shape == (150, 200, 3) and (coarse.image == pixels).all()
    assert (coarse.resolution, coarse.resolution_unit, coarse.labels.max()) == (1.0, "m", 3)
    assert areas(coarse)[1:] == [20 * 30, 40 * 30] and areas(coarse)[0] == 1

    fine = at_resolution(sample, 0.25)
    assert fine.labels.shape == (600, 800) and areas(fine) == [4 * a for a in areas(sample)]
    assert at_resolution(sample, 0.51) is sample  # within 5 %: the pipeline reads as is
    unreferenced = read_binary_mask(image_file(tmp_path), write_geotiff(np.zeros((H, W, 1), np.uint8), tmp_path / "m.tif", crs=None))
    with pytest.raises(AnnotationError, match="img: no pixel size"):
        at_resolution(unreferenced, 1.0)


def test_lon_lat_samples_are_resampled_axis_by_axis_to_square_ground_pixels(tmp_path):
    from pipeline.sources import open_raster

    # 1e-5° pixels at 70° N, 15° E: ~0.38 m across × 1.12 m down on the ground
    transform = Affine(1e-5, 0, 14.9985, 0, -1e-5, 70.001)
    raster = write_geotiff(np.zeros((200, 300, 3), np.uint8), tmp_path / "north.tif", crs="EPSG:4326", transform=transform)
    x, y = gpd.GeoSeries([shapely.Point(transform @ (150, 100))], crs="EPSG:4326").to_crs("EPSG:32633")[0].coords[0]
    square = shapely.box(x - 10, y - 10, x + 10, y + 10)  # 20 m on the ground: UTM 33N's central meridian is 15° E
    gpd.GeoDataFrame(geometry=[square], crs="EPSG:32633").to_file(tmp_path / "square.gpkg")
    sample = read_vector(raster, tmp_path / "square.gpkg")

    resampled, source = at_resolution(sample, 0.5), open_raster(raster, target_m=0.5)  # what run reads for a 0.5 m model
    assert resampled.labels.shape == (source.height, source.width)
    rows, cols = np.nonzero(resampled.labels == 1)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - 40) <= 2 and abs(width - 40) <= 2 and abs(height - width) <= 2  # square: 20 m at 0.5 m
    assert_well_formed(resampled)
    assert (resampled.resolution, resampled.pixel_sides) == (0.5, (0.5, 0.5))

    across, down = sample.pixel_sides
    assert across == pytest.approx(0.382, rel=0.01) and down == pytest.approx(1.116, rel=0.01)
    assert sample.resolution == pytest.approx(np.sqrt(across * down))
    assert resampled.labels.shape == (round(200 * down / 0.5), round(300 * across / 0.5))
    near = replace(sample, pixel_sides=(0.49, 0.51))
    assert at_resolution(near, 0.5) is near  # both axes within 5 %: read as is, as run reads it
    assert at_resolution(replace(sample, pixel_sides=(0.49, 1.0)), 0.5).labels.shape == (400, 300)  # across kept


def test_an_annotated_image_too_big_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    import psutil

    path = image_file(tmp_path, "big.tif", h=300, w=400)
    free = type("Memory", (), {"available": 300 * 400 * 40})  # twice what it needs would be 9.6 MB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with pytest.raises(AnnotationError, match=r"big.tif: 400×300 px; annotated images are read whole .* cut it into tiles"):
        read_binary_mask(path, path)
