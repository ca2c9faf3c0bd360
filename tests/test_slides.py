import json

import dask
import geopandas as gpd
import numpy as np
import pytest

from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.slides import choose_level, is_slide, open_slide
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
    source = open_image(path, target_mpp=0.25)
    assert (source.width, source.height, source.level) == (2220, 2967, 0) and source.mpp == pytest.approx(0.499)
    assert open_slide(path, target_mpp=0.25, mpp=0.25).mpp == 0.25  # --mpp overrides the file
    model = resolve_model_dir("nuclei-he")
    card = load_card(model)
    graph = image_graph(source, str(model), card.classes, tmp_path / "out", Tiling(card.tile_size, card.overlap, 4))
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
    assert {"Area µm^2", "Perimeter µm", "Score"} <= set(first["measurements"])


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
