import json
import uuid
import warnings

import dask
import geopandas as gpd
import numpy as np
import pytest

from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.grid import Span
from pipeline.slides import choose_level, is_slide, is_tiff_slide, open_slide, resample_factor
from pipeline.sources import SourceError, open_image
from pipeline.synthetic_raster import write_geotiff


def test_level_choice_follows_the_model_resolution():
    levels = [0.25, 0.5, 1.0, 2.0]
    assert choose_level(levels, 0.25) == 0
    assert choose_level(levels, 0.5) == 1
    assert choose_level(levels, 0.55) == 1
    assert choose_level(levels, 0.9) == 2  # 1.0 is within the 20 % tolerance
    assert choose_level(levels, 0.1) == 0  # never finer than level 0
    assert choose_level(levels, None) == 0


def test_geotiffs_are_not_slides(tmp_path):
    path = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "plain.tif")
    assert not is_slide(path)
    assert type(open_image(path)).__name__ == "RasterSource"


def test_real_svs_slide_end_to_end_in_level0_pixels_with_qupath_export(shared_data, tmp_path):
    path = shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs"
    assert is_slide(path)
    source = open_image(path, target_mpp=0.5)  # native: no resampling (the resampled path is tested below)
    assert (source.width, source.height, source.level, source.factor) == (2220, 2967, 0, 1.0)
    assert source.mpp == pytest.approx(0.499)
    assert open_slide(path, target_mpp=0.25, mpp=0.25).mpp == 0.25  # --mpp overrides the file
    model = resolve_model_dir("nuclei-he")
    card = load_card(model)
    graph = image_graph(source, str(model), card.classes, tmp_path / "out", Tiling(card.tile_size, card.overlap, 4, test_time_flips=False))
    (summary,) = dask.compute(graph.result, scheduler="sync")
    frame = gpd.read_file(tmp_path / "out" / "instances.gpkg", layer="instances")
    assert summary["instances"] == len(frame) > 200
    assert summary["tiles_background"] >= 5 and summary["tiles_skipped"] >= summary["tiles_background"]
    assert 0.15 < summary["tissue_fraction"] < 0.7
    assert summary["instances_per_mm2"] == pytest.approx(len(frame) / summary["tissue_mm2"])
    xmin, ymin, xmax, ymax = frame.total_bounds
    assert xmin >= 0 and ymin >= 0 and xmax <= 2220 and ymax <= 2967
    assert np.allclose(frame["area_um2"], frame["area_px"] * 0.499**2, rtol=1e-3)
    geojson = json.loads((tmp_path / "out" / "qupath.geojson").read_text())
    assert len(geojson["features"]) == len(frame)
    first = geojson["features"][0]["properties"]
    assert first["objectType"] == "detection" and first["classification"]["name"] == "nucleus"
    assert {"Area µm^2", "Perimeter µm", "Score", "Instance id"} <= set(first["measurements"])
    ids = [uuid.UUID(f["id"]) for f in geojson["features"]]  # QuPath keeps UUIDs only
    assert len(set(ids)) == len(ids) and sorted(f["properties"]["measurements"]["Instance id"] for f in geojson["features"]) == sorted(frame["instance_id"])


def test_unreadable_slide_is_named(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SourceError, match="broken.svs"):
        open_image(bad)


def test_tissue_mask_finds_stained_regions_on_glass():
    from pipeline.grid import TileGrid
    from pipeline.tissue import otsu_threshold, tiles_with_tissue, tissue_mask

    thumbnail = np.full((100, 120, 3), 240, np.uint8)
    rng = np.random.default_rng(0)
    thumbnail += rng.integers(0, 8, thumbnail.shape, dtype=np.uint8)
    thumbnail[20:60, 30:70] = (200, 120, 170)  # pink tissue
    mask = tissue_mask(thumbnail, margin=0)
    assert mask[25:55, 35:65].all() and not mask[80:, :].any() and not mask[:, 90:].any()
    assert 0 < otsu_threshold(np.r_[np.full(50, 0.1), np.full(50, 0.6)]) < 0.6
    tiles = TileGrid(1000, 1200, 256, 32).tiles  # processed pixels = 10 × thumbnail pixels
    keep = tiles_with_tissue(tiles, mask, scale=10.0)
    assert 0 < keep.sum() < len(tiles)
    for tile, kept in zip(tiles, keep):
        overlaps = tile.rows.start < 600 and tile.rows.stop > 200 and tile.cols.start < 700 and tile.cols.stop > 300
        assert kept == overlaps


def aperio_pyramid(source_svs, path):
    """A three-level Aperio-style pyramid (top-level IFDs, so OpenSlide sees every level)."""
    import openslide
    import tifffile

    with openslide.OpenSlide(str(source_svs)) as slide:
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    height, width = image.shape[:2]
    description = f"Aperio Image Library v10.0.0\n{width}x{height} [0,0 {width}x{height}] (256x256) RAW|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(path) as writer:
        for k, level in enumerate([image, image[::2, ::2], image[::4, ::4]]):
            writer.write(level, tile=(256, 256), photometric="rgb", description=description if k == 0 else None, metadata=None)
    return path


def model_at(tmp_path, resolution):
    import yaml

    base = resolve_model_dir("nuclei-he")
    card = yaml.safe_load((base / "model.yaml").read_text())
    card.update(resolution=resolution, resolution_unit="um", weights=str(base / "weights.safetensors"))
    folder = tmp_path / f"nuclei-he-{resolution}"
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump(card))
    return folder


def test_pyramid_level_selection_finds_the_same_nuclei(shared_data, tmp_path):
    original = shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs"
    pyramid = aperio_pyramid(original, tmp_path / "pyramid.svs")
    assert open_image(pyramid, target_mpp=0.5).level == 0
    assert open_image(pyramid, target_mpp=1.0).level == 1
    assert open_image(pyramid, target_mpp=2.0).level == 2

    def run(path, model, name):
        card = load_card(model)
        source = open_image(path, target_mpp=card.resolution)
        graph = image_graph(source, str(model), card.classes, tmp_path / name, Tiling(card.tile_size, card.overlap, 4, tissue_mask=False, test_time_flips=False))
        dask.compute(graph.result, scheduler="sync")
        return source, gpd.read_file(tmp_path / name / "instances.gpkg", layer="instances")

    fine = model_at(tmp_path, 0.5)
    _, direct = run(original, fine, "direct")
    _, level0 = run(pyramid, fine, "level0")
    assert len(level0) == len(direct) > 200
    assert (level0.geometry.values == direct.geometry.values).all()  # the same pixels, the same nuclei

    source, level1 = run(pyramid, model_at(tmp_path, 1.0), "level1")
    assert source.level == 1 and len(level1) > 50
    xmin, ymin, xmax, ymax = level1.total_bounds  # polygons come back in level-0 pixels
    assert xmax > 0.8 * 2220 and ymax > 0.8 * 2967 and xmax <= 2220 and ymax <= 2967
    # Coarse-level nuclei land on fine-level ones far more often than the same points shifted by
    # a few nuclei diameters would: the level-1 → level-0 mapping is right (the model itself is
    # far from its native resolution at level 1, so not every nucleus is found at both).
    centroids = level1.geometry.centroid
    aligned = len(np.unique(level0.sindex.query(centroids, predicate="within")[0]))
    shifted = len(np.unique(level0.sindex.query(centroids.translate(60, 60), predicate="within")[0]))
    assert aligned >= 2 * max(shifted, 5)


def test_an_aperio_slide_openslide_refuses_is_read_as_a_slide_at_its_own_pixel_size(shared_data, tmp_path):
    """Cut short, CMU-1 loses its trailing label and macro images and OpenSlide refuses it; its
    full-resolution image is whole: read through tifffile at the description's MPP, never taken
    for a plain raster of unknown scale."""
    original = shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs"
    cut = tmp_path / "cut.svs"
    cut.write_bytes(original.read_bytes()[: int(original.stat().st_size * 0.9)])
    with pytest.warns(UserWarning, match="cut.svs: an Aperio slide that OpenSlide cannot open"):
        source = open_image(cut, target_mpp=0.25)
    assert source.mpp == pytest.approx(0.499) and source.width == round(2220 * 0.499 / 0.25)
    import openslide

    with openslide.OpenSlide(str(original)) as slide:
        whole = np.asarray(slide.read_region((0, 0), 0, (300, 200)).convert("RGB"))
    assert (open_image(cut).read(Span(0, 200), Span(0, 300))[0] == whole).all()


def cmu1_pixels(shared_data, rows=slice(None), cols=slice(None)) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs")) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))[rows, cols]


def ome_pyramid(image, path, mpp: float | None = 0.499, levels: int = 3):
    """An OME-TIFF with its reduced levels in SubIFDs (the layout OpenSlide cannot see)."""
    import tifffile

    metadata = {"axes": "YXS", **({"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {})}
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(image, subifds=levels - 1, tile=(256, 256), photometric="rgb", metadata=metadata)
        for k in range(1, levels):
            writer.write(image[:: 2**k, :: 2**k], subfiletype=1, tile=(256, 256), photometric="rgb")
    return path


def test_ome_tiff_subifd_pyramid_levels_and_pixels(shared_data, tmp_path):
    from pipeline.grid import Span

    image = cmu1_pixels(shared_data, slice(0, 1300), slice(0, 1100))
    path = ome_pyramid(image, tmp_path / "crop.ome.tif")
    assert is_tiff_slide(path) and not is_slide(path)
    for target, level in [(0.5, 0), (1.0, 1), (2.0, 2)]:
        source = open_image(path, target_mpp=target)
        assert (source.backend, source.level, source.factor, source.mpp) == ("tifffile", level, 1.0, 0.499)
        assert (source.height, source.width) == image[:: 2**level, :: 2**level].shape[:2]
    source = open_image(path, target_mpp=1.0)
    pixels, valid = source.read(Span(100, 400), Span(250, 500))
    assert valid.all() and (pixels == image[::2, ::2][100:400, 250:500]).all()
    assert source.transform.a == pytest.approx(2.0, rel=1e-3)  # level-1 pixels → level-0 pixels
    thumbnail, valid, scale = source.thumbnail(max_size=600)
    assert max(thumbnail.shape[:2]) <= 600 and valid.all() and scale == pytest.approx(source.width / thumbnail.shape[1])


def test_slide_without_resolution_needs_mpp(shared_data, tmp_path):
    path = ome_pyramid(cmu1_pixels(shared_data, slice(0, 512), slice(0, 512)), tmp_path / "nompp.ome.tif", mpp=None)
    with pytest.raises(SourceError, match="nompp.ome.tif.*pass --mpp"):
        open_image(path, target_mpp=0.25)
    assert open_image(path, target_mpp=0.25, mpp=0.5).factor == pytest.approx(0.5)
    with pytest.raises(SourceError, match=r"nompp.ome.tif: pixels of 25 µm, the model's are 0.25 µm: refusing to upsample 100×"):
        open_image(path, target_mpp=0.25, mpp=25)  # --mpp 25 typed for 0.25


def test_resampling_to_the_model_resolution_keeps_level0_coordinates(shared_data, tmp_path):
    """CMU-1 is scanned at 0.5 µm/px and nuclei-he works at 0.25: windows are upsampled ×2, and
    the nuclei found there land on those found at native resolution, in level-0 pixels."""
    assert resample_factor(0.499, 0.2527) == pytest.approx(0.506, abs=1e-3) and resample_factor(0.5, 0.51) == 1.0
    image = cmu1_pixels(shared_data, slice(1400, 2200), slice(600, 1400))
    path = ome_pyramid(image, tmp_path / "crop.ome.tif", levels=1)

    def run(model, name):
        card = load_card(model)
        source = open_image(path, target_mpp=card.resolution)
        graph = image_graph(source, str(model), card.classes, tmp_path / name, Tiling(card.tile_size, card.overlap, 4, test_time_flips=False))
        dask.compute(graph.result, scheduler="sync")
        return source, gpd.read_file(tmp_path / name / "instances.gpkg", layer="instances")

    upsampled_source, upsampled = run(resolve_model_dir("nuclei-he"), "upsampled")
    assert upsampled_source.factor == pytest.approx(0.506, abs=1e-3)
    assert upsampled_source.width == round(800 / upsampled_source.factor) == 1580
    _, native = run(model_at(tmp_path, 0.5), "native")
    assert len(upsampled) > 100 and len(native) > 50
    xmin, ymin, xmax, ymax = upsampled.total_bounds
    assert xmin >= 0 and ymin >= 0 and xmax <= 800 and ymax <= 800 and xmax > 700 and ymax > 700
    assert np.allclose(upsampled["area_um2"], upsampled["area_px"] * 0.499**2, rtol=1e-3)
    centroids = upsampled.geometry.centroid
    aligned = len(np.unique(native.sindex.query(centroids, predicate="within")[0]))
    shifted = len(np.unique(native.sindex.query(centroids.translate(25, 25), predicate="within")[0]))
    assert aligned >= 0.4 * len(native) and aligned >= 2 * max(shifted, 5)


def test_slide_level_colour_normalisation_is_one_mapping_per_slide(shared_data, tmp_path):
    from pipeline.grid import Span
    from pipeline.inputs import open_for_model
    from pipeline.tissue import tissue_mask

    image = cmu1_pixels(shared_data, slice(0, 1536), slice(0, 1536))
    tinted = np.clip(image * np.array([0.75, 0.9, 1.05]) + np.array([10, -15, 0]), 0, 255).astype(np.uint8)
    reference = ome_pyramid(image, tmp_path / "reference.ome.tif")
    shifted = ome_pyramid(tinted, tmp_path / "tinted.ome.tif")
    thumbnail, valid, _ = open_image(reference).thumbnail()
    tissue = thumbnail[tissue_mask(thumbnail, valid, margin=0)].astype(float)
    mean, std = tissue.mean(0).tolist(), tissue.std(0).tolist()

    normalised = open_image(shifted).with_colour_normalisation(mean, std)
    assert normalised.colour is not None
    for rows, cols in [(Span(0, 512), Span(0, 512)), (Span(900, 1400), Span(700, 1200))]:
        original = image[rows.start : rows.stop, cols.start : cols.stop].astype(int)
        before = np.abs(open_image(shifted).read(rows, cols)[0] - original).mean()
        after = np.abs(normalised.read(rows, cols)[0] - original).mean()
        assert after < 0.5 * before  # glass clipped by the tint cannot come back exactly

    model = model_at(tmp_path, 0.5)
    card_path = model / "model.yaml"
    import yaml

    card = yaml.safe_load(card_path.read_text())
    card["input"].update(slide_normalisation=True, reference_mean=mean, reference_std=std)
    card_path.write_text(yaml.safe_dump(card))
    assert open_for_model(shifted, load_card(model)).colour == normalised.colour
    card["input"].pop("reference_std")
    card_path.write_text(yaml.safe_dump(card))
    from models.card import ModelCardError

    with pytest.raises(ModelCardError, match="reference"):
        load_card(model)


def test_generated_slide_with_tissue_islands_reads_only_tissue(tmp_path):
    """The path of the 100k² benchmark (benchmarks/slide_scale.py) at a size a test can afford."""
    from pipeline.synthetic_slide import make_islands, write_slide
    from tests.helpers import label_polygons, match_f1

    islands = make_islands(6000, 7000, 2, 640, seed=5)
    path = write_slide(tmp_path / "slide.ome.tif", 6000, 7000, islands, mpp=0.25)
    model = resolve_model_dir()
    card = load_card(model)
    source = open_image(path, target_mpp=card.resolution)
    assert (source.backend, source.level, source.height, source.width) == ("tifffile", 0, 6000, 7000)
    graph = image_graph(source, str(model), card.classes, tmp_path / "out", Tiling(512, 64, 4))
    (summary,) = dask.compute(graph.result, scheduler="sync")
    read = summary["tiles"] - summary["tiles_background"]
    from pipeline.grid import TileGrid

    assert summary["tiles"] == len(TileGrid(6000, 7000, 512, 64).tiles)
    assert 2 <= read <= 2 * 9  # a 640² island touches at most 3 × 3 windows of 512 with overlap 64
    assert summary["tissue_fraction"] < 0.05
    frame = gpd.read_file(tmp_path / "out" / "instances.gpkg", layer="instances")
    import shapely

    truth = np.array([
        shapely.affinity.translate(polygon, island.col, island.row)
        for island in islands for polygon in label_polygons(island.scene.labels).values()
    ])
    assert match_f1(frame.geometry.values, truth) > 0.9


def test_labels_of_a_resampled_slide_carry_its_processed_pixel_size(tmp_path):
    """A 0.5 µm/px slide read at 0.25 µm/px: labels.zarr's pixels are 0.25 µm (OME-NGFF scale),
    and its transform maps them to level-0 pixels."""
    import zarr

    from pipeline.synthetic_slide import make_islands, write_slide

    path = write_slide(tmp_path / "slide.ome.tif", 1200, 1000, make_islands(1200, 1000, 1, 300, seed=2), mpp=0.5)
    model = resolve_model_dir()
    source = open_image(path, target_mpp=0.25)
    assert source.factor == pytest.approx(0.5) and (source.height, source.width) == (2400, 2000)
    graph = image_graph(source, str(model), load_card(model).classes, tmp_path / "out", Tiling(512, 64, 4), labels=True)
    dask.compute(graph.result, scheduler="sync")
    root = zarr.open_group(tmp_path / "out" / "labels.zarr", mode="r")
    for name in ("labels", "classes"):
        datasets = root[name].attrs["ome"]["multiscales"][0]["datasets"]
        assert [d["coordinateTransformations"][0]["scale"] for d in datasets[:2]] == [[0.25, 0.25], [0.5, 0.5]]
    assert root.attrs["geotransform"] == [0.0, 0.5, 0.0, 0.0, 0.0, 0.5]


@pytest.mark.parametrize("compression", ["jpeg", "lzw", "zstd", "jpeg2000"])
def test_pyramidal_tiffs_in_the_usual_codecs_read(tmp_path, compression):
    """JPEG (QuPath's and bfconvert's OME-TIFF default), LZW, zstd and JPEG 2000 tiles decode."""
    import tifffile

    from models.synthetic import make_scene
    from pipeline.grid import Span

    image = make_scene(3, 700, 600).image
    path = tmp_path / f"{compression}.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        options = dict(tile=(256, 256), photometric="rgb", compression=compression)
        writer.write(image, subifds=1, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        writer.write(image[::2, ::2], subfiletype=1, **options)
    source = open_image(path, target_mpp=0.25)
    pixels, valid = source.read(Span(100, 500), Span(50, 450))
    decoded = tifffile.imread(path) if compression == "jpeg" else image  # JPEG is lossy: its own decoding
    assert valid.all() and (pixels == decoded[100:500, 50:450]).all()


def test_a_corrupt_tile_of_a_pyramidal_tiff_is_named(tmp_path):
    """Garbage in one compressed tile: the read fails with the file, the level and the rows, not
    with a codec's bare error."""
    import tifffile

    from models.synthetic import make_scene
    from pipeline.grid import Span
    from pipeline.sources import SourceError

    path = tmp_path / "corrupt.ome.tif"
    tifffile.imwrite(path, make_scene(4, 600, 600).image, ome=True, tile=(256, 256), photometric="rgb",
                     compression="zlib", metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * size)
    source = open_image(path, target_mpp=0.25)
    with pytest.raises(SourceError, match=r"corrupt.ome.tif: read failed at level 0, rows 0:256, the file may be truncated"):
        source.read(Span(0, 256), Span(0, 256))
    with pytest.raises(SourceError, match=r"corrupt.ome.tif: thumbnail read failed"):
        source.thumbnail()


def test_fluorescence_channels_are_channels_and_bands_pick_them(tmp_path):
    """An OME-TIFF's channel axis (DAPI, FITC, …) is never alpha; --bands picks channels; a second
    channel without --bands is refused, naming the option."""
    import tifffile

    from pipeline.grid import Span
    from pipeline.sources import SourceError

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 100, (4, 300, 400), dtype=np.uint8)  # channel 4 mostly < 128: "transparent" as alpha
    path = tmp_path / "four.ome.tif"
    tifffile.imwrite(path, stack, ome=True, tile=(256, 256), metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.warns(UserWarning, match="4 channels, the first three used"):
        source = open_image(path, target_mpp=0.5)
    pixels, valid = source.read(Span(0, 300), Span(0, 400))
    assert valid.all() and (pixels == stack[:3].transpose(1, 2, 0)).all()
    source = open_image(path, bands=(4,), target_mpp=0.5)
    pixels, valid = source.read(Span(0, 300), Span(0, 400))
    assert valid.all() and all((pixels[..., k] == stack[3]).all() for k in range(3))
    thumbnail, _, _ = source.thumbnail()
    assert (thumbnail[..., 0] == stack[3]).all()
    with pytest.raises(SourceError, match="four.ome.tif: --bands 5: the slide has 4 channel"):
        open_image(path, bands=(5,), target_mpp=0.5)
    two = tmp_path / "two.ome.tif"
    tifffile.imwrite(two, stack[:2], ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(SourceError, match="two.ome.tif: 2 channels; choose one .or three. with --bands"):
        open_image(two, target_mpp=0.5)


def test_mpp_that_contradicts_the_file_is_said(shared_data):
    path = shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs"
    with pytest.warns(UserWarning, match=r"CMU-1-Small-Region.svs: --mpp 0.25 overrides the file's 0.499 µm per pixel"):
        open_slide(path, target_mpp=0.25, mpp=0.25)


def test_a_level_squeezed_in_one_direction_is_not_used(tmp_path):
    """Level 1 halves the width but not the height: reading it, or placing tissue by it, would put
    rows in the wrong place; the next consistent level is used and the thumbnail keeps the aspect."""
    import tifffile

    from models.synthetic import make_scene

    image = make_scene(5, 1200, 1000).image
    path = tmp_path / "squeezed.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        options = dict(tile=(256, 256), photometric="rgb")
        writer.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        writer.write(image[::3, ::2], subfiletype=1, **options)  # 400 × 500: y downsampled 3×, x 2×
        writer.write(image[::4, ::4], subfiletype=1, **options)
    with pytest.warns(UserWarning, match=r"level\(s\) 1 \(500×400\) not scaled like level 0"):
        source = open_image(path, target_mpp=0.5)
    assert (source.level, source.height, source.width) == (0, 600, 500) and source.factor == pytest.approx(2.0)
    thumbnail, valid, scale = source.thumbnail(max_size=600)
    assert thumbnail.shape[0] == pytest.approx(thumbnail.shape[1] * 1.2, abs=1)


def test_a_flat_microscopy_tiff_is_read_at_its_pixel_size(tmp_path):
    """A region exported from a slide (one level, resolution tags in µm range, no georeferencing)
    is resampled to the model's pixel size like a slide; 72 dpi tags are not a microscope's."""
    import tifffile

    from pipeline.grid import Span
    from pipeline.sources import RasterSource

    image = np.zeros((400, 600, 3), np.uint8)
    microns = tmp_path / "region.tif"
    tifffile.imwrite(microns, image, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")  # 0.5 µm
    source = open_image(microns, target_mpp=0.25)
    assert not isinstance(source, RasterSource) and source.mpp == pytest.approx(0.5) and (source.height, source.width) == (800, 1200)
    dpi = tmp_path / "photo.tif"
    tifffile.imwrite(dpi, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert isinstance(open_image(dpi, target_mpp=0.25), RasterSource)
    assert open_image(dpi, target_mpp=0.25, mpp=0.5).mpp == 0.5  # --mpp says it is one
    field = tmp_path / "field.tif"  # a fluorescence camera's 16-bit frame, 0.65 µm pixels
    tifffile.imwrite(field, np.tile(np.arange(600, dtype=np.uint16) * 50, (400, 1)), resolution=(1 / 0.65e-4, 1 / 0.65e-4),
                     resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="field.tif: uint16 data scaled to 8 bits"):
        source = open_image(field, target_mpp=0.325)
    assert source.mpp == pytest.approx(0.65) and (source.height, source.width) == (800, 1200)
    pixels, _ = source.read(Span(0, 64), Span(0, 1200))
    assert pixels.dtype == np.uint8 and pixels[0, 0, 0] <= 2 and pixels[0, -1, 0] >= 253 and (np.diff(pixels[0, :, 0].astype(int)) >= 0).all()
    assert not isinstance(open_image(field, target_mpp=0.325, bands=(1,)), RasterSource)
    from pipeline.synthetic_raster import write_geotiff

    geotiff = write_geotiff(image, tmp_path / "scene.tif")
    with pytest.warns(UserWarning, match="scene.tif: --mpp ignored: a georeferenced raster's pixel size comes from its CRS"):
        assert isinstance(open_image(geotiff, mpp=0.5), RasterSource)


def test_a_microscopy_png_is_read_at_the_pixel_size_given_and_warned_about_without_one(shared_data, tmp_path):
    """A PNG or JPEG export of a slide region carries no pixel size: --mpp gives it (resampled to the
    model's like a slide, areas in µm²); without it the image is read as it is, and that is said."""
    from PIL import Image

    from models.card import load_card
    from pipeline.inputs import open_for_model

    tile = shared_data / "nuclei-monuseg2018" / "images" / "TCGA-A6-6782-01A-01-BS1.tif"
    with Image.open(tile) as full:
        full.convert("RGB").crop((0, 0, 600, 600)).resize((300, 300), Image.Resampling.BILINEAR).save(tmp_path / "half.png")
    card = load_card(resolve_model_dir("nuclei-he"))
    with pytest.warns(UserWarning, match=r"half.png: pixel size unknown .* the model's 0.2527 µm per pixel; give --mpp"):
        assert open_for_model(tmp_path / "half.png", card).width == 300
    source = open_for_model(tmp_path / "half.png", card, mpp=0.5054)
    assert source.mpp == 0.5054 and (source.width, source.height) == (600, 600) and source.pixel_scale == pytest.approx(0.5)
    tiling = Tiling(card.tile_size, card.overlap, 4, test_time_flips=False)
    dask.compute(image_graph(source, str(resolve_model_dir("nuclei-he")), card.classes, tmp_path / "out", tiling).result,
                 scheduler="sync")
    found = gpd.read_file(tmp_path / "out" / "instances.gpkg", layer="instances")
    assert len(found) > 30 and found.total_bounds[2] <= 300  # polygons in the PNG's own pixels
    median = found["area_um2"].median()  # H&E nuclei: ~20-40 µm²
    assert 10 < median < 80 and np.allclose(found["area_um2"], found.geometry.area * 0.5054**2, rtol=1e-6)


def test_a_slide_without_tissue_is_said_and_no_tissue_reads_every_tile(tmp_path):
    import tifffile

    from pipeline.graph import foreground_tiles
    from pipeline.grid import TileGrid

    path = tmp_path / "glass.ome.tif"
    tifffile.imwrite(path, np.full((700, 600, 3), 231, np.uint8), ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    source = open_image(path, target_mpp=0.25)
    tiles = TileGrid(source.height, source.width, 256, 32).tiles
    with pytest.warns(UserWarning, match="glass.ome.tif: no tissue found on the thumbnail: nothing to segment"):
        assert foreground_tiles(source, tiles)[0] == []
    kept, info = foreground_tiles(source, tiles, tissue=False)
    assert kept == tiles and info["tissue_fraction"] == 1.0


def test_sixteen_bit_fluorescence_slides_are_scaled_once_per_slide(tmp_path):
    """uint16 OME-TIFFs (most fluorescence scanners): the chosen channel is mapped to 8 bits by one
    range for the whole slide (its thumbnail's percentiles, or --value-range), the same in every tile."""
    import tifffile

    from pipeline.grid import Span

    rng = np.random.default_rng(1)
    stack = rng.integers(100, 4000, (2, 800, 600), dtype=np.uint16)
    path = tmp_path / "dapi-fitc.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(stack, subifds=1, tile=(256, 256), metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        writer.write(stack[:, ::2, ::2], subfiletype=1, tile=(256, 256))
    with pytest.warns(UserWarning, match="dapi-fitc.ome.tif: uint16 data scaled to 8 bits"):
        source = open_image(path, bands=(2,), target_mpp=0.5)
    (low, high), = set(source.value_range)
    assert low == pytest.approx(np.percentile(stack[1], 0.5), rel=0.05) and high == pytest.approx(np.percentile(stack[1], 99.5), rel=0.05)
    pixels, valid = source.read(Span(300, 556), Span(100, 356))
    expected = np.clip((stack[1, 300:556, 100:356] - low) / (high - low) * 255, 0, 255).round()
    assert valid.all() and all(np.abs(pixels[..., k] - expected).max() <= 1 for k in range(3))
    source = open_image(path, bands=(1,), value_range=(0.0, 4080.0), target_mpp=0.5)
    pixels, _ = source.read(Span(0, 100), Span(0, 100))
    assert (pixels[..., 0] == np.round(stack[0, :100, :100] / 16)).all()


def test_non_square_pixels_and_tiffs_by_content_are_said(tmp_path):
    import tifffile

    path = tmp_path / "scan.qptiff"  # a TIFF by its bytes (Akoya's suffix), not by its name
    image = np.zeros((300, 300, 3), np.uint8)
    image[100:110, 40:60] = 255  # 5 µm across, 5 µm down
    tifffile.imwrite(path, image, ome=True, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    with pytest.warns(UserWarning, match=r"scan.qptiff: pixels are 0.25 × 0.5 µm .across × down.; resampled axis by axis"):
        source = open_image(path, target_mpp=0.25)
    assert source.backend == "tifffile" and source.mpp_sides == (0.25, 0.5) and (source.width, source.height) == (300, 600)
    pixels, _ = source.read(Span(0, 600), Span(0, 300))
    rows, cols = np.nonzero(pixels[..., 0] > 127)  # the model sees the square as square
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (200, 220, 40, 60)
    assert source.transform.e == pytest.approx(0.5)  # polygons come back in level-0 pixels


def test_qupath_perimeters_use_both_sides_of_non_square_pixels():
    import pyarrow as pa
    import shapely

    from pipeline.writers import _qupath_features

    box = shapely.box(10, 20, 14, 22)  # 4 pixels across at 0.25 µm, 2 down at 0.5 µm: 1 µm × 1 µm
    batch = pa.RecordBatch.from_pydict({
        "image_id": ["scan"], "instance_id": [1], "class": ["nucleus"], "score": [0.9], "area_um2": [1.0],
        "geometry": [shapely.to_wkb(box)],
    })
    (feature,) = json.loads(f"[{_qupath_features(batch, (0.25, 0.5))}]")
    assert feature["properties"]["measurements"]["Perimeter µm"] == pytest.approx(4.0)


def test_a_tiff_georeferenced_by_its_sidecars_stays_a_raster(tmp_path):
    """A baseline TIFF (no GeoTIFF tags) with a world file and .aux.xml, given internal overviews
    (gdaladdo): GDAL places it on the ground, so it is read as a raster in its CRS, not as a slide
    in pixels (its polygons had no CRS, and tissue detection skipped grey roofs)."""
    import rasterio
    from rasterio.enums import Resampling

    from pipeline.sources import RasterSource
    from pipeline.synthetic_raster import DEFAULT_TRANSFORM

    path = tmp_path / "ortho.tif"
    with rasterio.open(path, "w", driver="GTiff", height=600, width=700, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=DEFAULT_TRANSFORM, PROFILE="BASELINE", TFW="YES", tiled=True, photometric="RGB") as dataset:
        dataset.write(np.full((3, 600, 700), 120, np.uint8))
    with rasterio.open(path, "r+") as dataset:
        dataset.build_overviews([2, 4], Resampling.average)
    assert (tmp_path / "ortho.tfw").is_file()
    source = open_image(path)
    assert isinstance(source, RasterSource) and "32632" in source.crs_wkt and source.transform == DEFAULT_TRANSFORM
    for sidecar in ("ortho.tfw", "ortho.tif.aux.xml"):  # without them the same pixels are a pyramid: a slide
        (tmp_path / sidecar).unlink(missing_ok=True)
    assert not isinstance(open_image(path, mpp=0.5), RasterSource)


def test_a_satellite_tiff_with_rpcs_and_overviews_stays_a_raster(tmp_path):
    """Before orthorectification a scene has RPCs and no geotransform; with internal overviews it
    looked like a slide's pyramid: tissue-masked (grey roofs dropped) and no word about the RPCs."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.rpc import RPC

    from pipeline.sources import RasterSource

    rpcs = RPC(height_off=100, height_scale=500, lat_off=48.93, lat_scale=0.01, line_den_coeff=[1] + [0] * 19,
               line_num_coeff=[0, 0, -1] + [0] * 17, line_off=300, line_scale=300, long_off=2.05, long_scale=0.01,
               samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=300, samp_scale=300)
    path = tmp_path / "scene.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio: no geotransform
        with rasterio.open(path, "w", driver="GTiff", height=600, width=600, count=3, dtype="uint8", tiled=True,
                           photometric="RGB") as dataset:
            dataset.write(np.full((3, 600, 600), 120, np.uint8))
            dataset.rpcs = rpcs
            dataset.build_overviews([2, 4], Resampling.average)
    with pytest.warns(UserWarning, match="RPCs only"):
        source = open_image(path)
    assert isinstance(source, RasterSource) and source.crs_wkt is None


def test_planes_and_images_beyond_the_first_are_said(tmp_path):
    """A Z stack, a time series or a multi-page microscopy TIFF: the first plane is segmented, and
    the file is said to hold more."""
    import tifffile

    stack = np.zeros((3, 64, 80), np.uint16)
    tifffile.imwrite(tmp_path / "z.ome.tif", stack, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.warns(UserWarning, match="z.ome.tif: 3 focal planes .Z. in the file; only the first plane"):
        source = open_image(tmp_path / "z.ome.tif", target_mpp=0.5, value_range=(0, 100))
    assert (source.width, source.height) == (80, 64)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for _ in range(2):
            tif.write(np.zeros((64, 80, 3), np.uint8), photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="pages.tif: 2 images in the file"):
        open_image(tmp_path / "pages.tif", target_mpp=0.5)


def test_a_read_far_coarser_than_the_file_is_said(tmp_path):
    """0.01 µm in the metadata (a slip for 0.1 or 1): the image would be read at 1/25 of its
    pixels, its nuclei a pixel wide. Not refused (5 cm drone pixels for a 0.5 m model are meant), but said."""
    import tifffile

    tifffile.imwrite(tmp_path / "slip.ome.tif", np.zeros((500, 500, 3), np.uint8), ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.01, "PhysicalSizeY": 0.01})
    with pytest.warns(UserWarning, match=r"slip.ome.tif: pixels of 0.01 µm, the model's are 0.25 µm: read at 1/25 of the resolution"):
        assert open_image(tmp_path / "slip.ome.tif", target_mpp=0.25).width == 20
