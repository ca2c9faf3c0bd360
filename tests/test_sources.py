import re
import warnings

import numpy as np
import pyproj
import pytest
import rasterio
from distributed import protocol
from distributed.core import error_message

from pipeline.grid import Span
from pipeline.sources import SourceError, open_raster, pixel_sides_m, pixel_size_m, read_window
from pipeline.synthetic_raster import write_geotiff

FULL = (Span(0, 64), Span(0, 80))


def test_missing_empty_truncated_and_non_image_files_are_named(tmp_path):
    with pytest.raises(SourceError, match=r"absent\.tif: file not found"):
        open_raster(tmp_path / "absent.tif")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty\.tif: empty file"):
        open_raster(tmp_path / "empty.tif")
    (tmp_path / "folder.tif").mkdir()
    with pytest.raises(SourceError, match=r"folder\.tif: a directory, not an image file"):
        open_raster(tmp_path / "folder.tif")
    (tmp_path / "notes.tif").write_text("these are not pixels")
    with pytest.raises(SourceError, match=r"notes\.tif: not a readable raster"):
        open_raster(tmp_path / "notes.tif")
    good = write_geotiff(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8), tmp_path / "cut.tif")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.tif") as caught:
        source = open_raster(good)
        read_window(source, Span(0, 600), Span(0, 600))
    # what a Dask worker sends back is the error itself (GDAL's errors chained to it made it a bare Exception)
    sent = error_message(caught.value)["exception"]
    assert type(protocol.pickle.loads(sent.data)) is SourceError and "may be truncated" in str(caught.value)


def test_band_rules(tmp_path):
    rng = np.random.default_rng(1)
    grey = write_geotiff(rng.integers(0, 255, (64, 80, 1), dtype=np.uint8), tmp_path / "grey.tif")
    source = open_raster(grey)
    assert source.bands == (1, 1, 1)
    pixels, valid = read_window(source, *FULL)
    assert pixels.shape == (64, 80, 3) and (pixels[..., 0] == pixels[..., 2]).all() and valid.all()
    two = write_geotiff(rng.integers(0, 255, (64, 80, 2), dtype=np.uint8), tmp_path / "two.tif")
    with pytest.raises(SourceError, match=r"two\.tif: 2 colour bands"):
        open_raster(two)
    five = write_geotiff(rng.integers(0, 255, (64, 80, 5), dtype=np.uint8), tmp_path / "five.tif")
    assert open_raster(five).bands == (1, 2, 3)
    assert open_raster(five, bands=(5, 4, 3)).bands == (5, 4, 3)
    with pytest.raises(SourceError, match=r"five\.tif: no band 0, 6: the image has 5 band"):
        open_raster(five, bands=(6, 0, 2))
    with pytest.raises(SourceError, match=r"five\.tif: 2 bands chosen, the model needs 3"):
        open_raster(five, bands=(1, 2))
    import rasterio
    from rasterio.enums import ColorInterp

    with rasterio.open(five, "r+") as dataset:  # Blue, Green, Red, NIR, …: as Planet's analytic products are tagged
        dataset.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined, ColorInterp.undefined]
    with pytest.warns(UserWarning, match=r"five\.tif: bands 3,2,1 read as red, green, blue"):
        assert open_raster(five).bands == (3, 2, 1)
    assert open_raster(five, bands=(1, 2, 3)).bands == (1, 2, 3)  # --bands decides


def test_a_multi_page_tiff_is_read_from_its_first_page_with_a_warning(tmp_path):
    import tifffile

    pages = np.random.default_rng(5).integers(0, 255, (2, 64, 80, 3), dtype=np.uint8)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tiff:
        for page in pages:
            tiff.write(page, photometric="rgb")
    with pytest.warns(UserWarning, match=r"pages\.tif: 2 images in the file; only the first is read"):
        source = open_raster(path)
    assert (read_window(source, *FULL)[0] == pages[0]).all()


def test_colour_mapped_band_is_read_through_its_colour_table(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    index = rng.integers(0, 12, (64, 80), dtype=np.uint8)
    colours = rng.integers(0, 255, (12, 3), dtype=np.uint8)
    tiff = tmp_path / "palette.tif"
    with rasterio.open(tiff, "w", driver="GTiff", width=80, height=64, count=1, dtype="uint8", photometric="palette") as dst:
        dst.write(index, 1)
        dst.write_colormap(1, {v: (*colours[v].tolist(), 255) for v in range(12)})
    png = tmp_path / "palette.png"  # PNG tables carry transparency: value 7 is transparent
    picture = Image.fromarray(index, "P")
    picture.putpalette(colours.ravel().tolist())
    picture.save(png, transparency=bytes([0 if v == 7 else 255 for v in range(12)]))
    for path, transparent in ((tiff, np.zeros_like(index, bool)), (png, index == 7)):
        source = open_raster(path)
        assert source.bands == (1, 1, 1) and source.value_range is None
        pixels, valid = read_window(source, *FULL)
        assert (valid == ~transparent).all()
        assert (pixels[valid] == colours[index][valid]).all() and (pixels[~valid] == 0).all()


def test_sixteen_bit_is_scaled_once_per_image_with_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(1000, 5000, (200, 300, 3), dtype=np.uint16)
    path = write_geotiff(data, tmp_path / "u16.tif")
    with pytest.warns(UserWarning, match="uint16 data scaled"):
        source = open_raster(path)
    lo, hi = source.value_range[0]
    assert 1000 <= lo < 1100 and 4900 < hi <= 5000
    left, _ = read_window(source, Span(0, 200), Span(0, 150))
    right, _ = read_window(source, Span(0, 200), Span(150, 300))
    expected = np.clip((data[..., 0].astype(np.float64) - lo) / (hi - lo) * 255, 0, 255).round()
    assert np.abs(np.hstack([left, right])[..., 0] - expected).max() <= 1
    fixed = open_raster(path, value_range=(0, 10000))
    assert fixed.value_range == ((0.0, 10000.0),) * 3


def test_a_bilevel_tiff_reads_black_and_white_not_zero_and_one(tmp_path):
    bits = (np.indices((64, 80)).sum(axis=0) // 8 % 2).astype(np.uint8)
    path = tmp_path / "bilevel.tif"
    with rasterio.open(path, "w", driver="GTiff", width=80, height=64, count=1, dtype="uint8", nbits=1) as dst:
        dst.write(bits, 1)
    with rasterio.open(path) as check:
        assert check.read(1).max() == 1  # what GDAL hands over
    pixels, valid = read_window(open_raster(path), *FULL)
    assert valid.all() and np.array_equal(pixels[..., 0], bits * 255)


def test_gdal_messages_about_a_harmless_bad_tag_do_not_reach_stderr(tmp_path, capfd):
    """GDAL prints its own messages to stderr when a read happens outside a rasterio.Env (a kept handle):
    a microscope's TIFF with a NUL in its DateTime tag put a "Warning 1: TIFFFetchNormalTag" line in every log."""
    import tifffile

    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, np.full((64, 80, 3), 90, np.uint8), photometric="rgb",
                     extratags=[(306, "s", 0, "2020:01:01\x0000:00:00", True)])
    pixels, _ = read_window(open_raster(path), *FULL)
    assert (pixels == 90).all()
    assert "TIFFFetchNormalTag" not in capfd.readouterr().err


def test_float_nan_and_nodata_pixels_are_invalid(tmp_path):
    data = np.full((64, 80, 3), 0.5, np.float32)
    data[:10] = np.nan
    data[-5:] = -9999
    path = write_geotiff(data, tmp_path / "f32.tif", nodata=-9999)
    with pytest.warns(UserWarning):
        source = open_raster(path)
    pixels, valid = read_window(source, *FULL)
    assert not valid[:10].any() and not valid[-5:].any() and valid[10:-5].all()
    assert (pixels[~valid] == 0).all()


def test_all_nodata_image_reads_as_invalid(tmp_path):
    path = write_geotiff(np.zeros((64, 80, 3), np.uint8), tmp_path / "blank.tif", nodata=0)
    pixels, valid = read_window(open_raster(path), *FULL)
    assert not valid.any()


def test_real_geotiffs_keep_crs_transform_and_nodata(shared_data):
    path = shared_data / "geotiff-rasterio-rgb-byte" / "RGB.byte.tif"
    source = open_raster(path)
    with rasterio.open(path) as dataset:
        assert source.crs_wkt == dataset.crs.to_wkt()
        assert source.transform == dataset.transform
        assert (source.height, source.width) == (dataset.height, dataset.width)
        corner = dataset.read(1, window=((0, 50), (0, 50)))
    pixels, valid = read_window(source, Span(0, 50), Span(0, 50))
    assert not valid[0, 0] and (pixels[~valid] == 0).all()
    assert np.array_equal(pixels[..., 0][valid], corner[valid])


def test_projected_raster_is_resampled_to_the_model_resolution(tmp_path):
    from rasterio.enums import Resampling

    image = np.random.default_rng(3).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    path = write_geotiff(image, tmp_path / "half-metre.tif")  # EPSG:32631, 0.5 m pixels
    assert open_raster(path, target_m=0.51).factor == 1.0  # within 5 %: read as is
    source = open_raster(path, target_m=1.0)
    assert (source.factor, source.height, source.width) == (2.0, 300, 350)
    assert source.transform.a == pytest.approx(1.0) and source.transform.c == pytest.approx(430000.0)
    pixels, valid = source.read(Span(0, 300), Span(0, 350))
    with rasterio.open(path) as dataset:
        expected = dataset.read(out_shape=(3, 300, 350), resampling=Resampling.bilinear).transpose(1, 2, 0)
    assert valid.all() and (pixels == expected).all()
    assert open_raster(path, target_m=0.25).width == 1400  # coarser imagery is upsampled
    # a grid that does not divide evenly: areas in pixels follow the grid read (rounded)
    odd = open_raster(path, target_m=0.67)
    with rasterio.open(path) as dataset:
        across, down = pixel_sides_m(dataset.crs.to_wkt(), dataset.transform, 700, 600)
    assert (odd.width, odd.height) == (round(700 * across / 0.67), round(600 * down / 0.67)) != (700 * 0.5 / 0.67, 600 * 0.5 / 0.67)
    assert odd.pixel_scale**2 == pytest.approx(abs(odd.transform.determinant) / 0.25, rel=1e-12)
    unreferenced = write_geotiff(image, tmp_path / "pixels.tif", crs=None, transform=rasterio.Affine.identity())
    assert open_raster(unreferenced, target_m=1.0).factor == 1.0  # no metric pixel size: never guessed


@pytest.mark.parametrize("crs, side", [("EPSG:3857", 1.0), ("EPSG:3395", 1.0), ("EPSG:4807", 1e-5), ("EPSG:32632", 0.5)])
def test_pixel_sides_are_ground_metres_whatever_the_crs_measures_in(crs, side):
    """Web Mercator's metres at 60° N are half the ground's: resampled by them, a model saw 0.24 m
    pixels for 0.48 m; NTF's lon/lat is in grads."""
    geographic = pyproj.CRS.from_user_input(crs).is_geographic
    to_crs = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x, y = to_crs.transform(9.0, 60.0)
    transform = rasterio.Affine(side, 0, x, 0, -side, y)
    across, down = pixel_sides_m(pyproj.CRS.from_user_input(crs).to_wkt(), transform, 100, 100)
    back = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    (lon0, lon1, lon2), (lat0, lat1, lat2) = back.transform([x + 50 * side, x + 51 * side, x + 50 * side], [y - 50 * side, y - 50 * side, y - 51 * side])
    geod = pyproj.Geod(ellps="WGS84")
    truth = geod.line_length([lon0, lon1], [lat0, lat1]), geod.line_length([lon0, lon2], [lat0, lat2])
    assert (across, down) == (pytest.approx(truth[0], rel=2e-3), pytest.approx(truth[1], rel=2e-3))
    if not geographic:
        assert across < 0.51 * side or crs == "EPSG:32632"  # at 60° N a Mercator metre is half a ground metre


def test_lon_lat_raster_is_resampled_axis_by_axis_to_square_ground_pixels(tmp_path):
    image = np.random.default_rng(4).integers(0, 255, (400, 500, 3), dtype=np.uint8)
    # 1e-5° pixels at 50° N on WGS84: 0.717 m east-west, 1.112 m north-south
    path = write_geotiff(image, tmp_path / "degrees.tif", crs="EPSG:4326",
                         transform=rasterio.Affine(1e-5, 0, 10, 0, -1e-5, 50.002))
    with rasterio.open(path) as dataset:
        size = pixel_size_m(dataset.crs.to_wkt(), dataset.transform, dataset.width, dataset.height)
        across, down = pixel_sides_m(dataset.crs.to_wkt(), dataset.transform, dataset.width, dataset.height)
    assert (across, down) == (pytest.approx(0.717, rel=2e-3), pytest.approx(1.112, rel=2e-3))
    assert size == pytest.approx(np.sqrt(across * down))
    source = open_raster(path, target_m=2.0)  # each axis to 2 m: 500 × 0.717 / 2 columns, 400 × 1.112 / 2 rows
    assert (source.height, source.width) == (round(400 * down / 2), round(500 * across / 2))
    assert source.factor == pytest.approx(np.sqrt(2 / across * 2 / down), rel=0.01)  # of the rounded grid:
    assert source.factor == pytest.approx(np.sqrt(500 / source.width * 400 / source.height), rel=1e-12)
    ground = pixel_sides_m(source.crs_wkt, source.transform, source.width, source.height)
    assert ground == (pytest.approx(2.0, rel=0.01), pytest.approx(2.0, rel=0.01))  # square, as the model was trained
    pixels, valid = read_window(source, Span(0, source.height), Span(0, source.width))
    assert pixels.shape == (source.height, source.width, 3) and valid.all()
    assert open_raster(path, target_m=1.04 * 0.717).width == 500  # within 5 % across: that axis read as is
    with pytest.raises(SourceError, match=r"degrees\.tif: pixels of .* refusing to upsample"):
        open_raster(path, target_m=size / 20)


def test_nodata_regions_are_masked_from_an_overview_before_reading(tmp_path):
    from pipeline.graph import foreground_tiles
    from pipeline.grid import TileGrid

    image = np.zeros((1200, 1500, 3), np.uint8)
    image[100:400, 900:1300] = 200  # one patch of data on nodata
    source = open_raster(write_geotiff(image, tmp_path / "patch.tif", nodata=0))
    tiles = TileGrid(1200, 1500, 256, 32).tiles
    kept, info = foreground_tiles(source, tiles)
    overlapping = [t for t in tiles if t.rows.start < 400 and t.rows.stop > 100 and t.cols.start < 1300 and t.cols.stop > 900]
    assert set(t.index for t in overlapping) <= set(t.index for t in kept)
    assert len(kept) <= len(overlapping) + 8 and 0.05 < info["data_fraction"] < 0.15
    full = open_raster(write_geotiff(image + 1, tmp_path / "full.tif"))
    assert len(foreground_tiles(full, tiles)[0]) == len(tiles)
    # float data with a NaN collar and no nodata tag (numpy outputs, reprojections): the same
    collar = np.full(image.shape, np.nan, np.float32)
    collar[100:400, 900:1300] = 0.5
    with pytest.warns(UserWarning, match="float32 data scaled"):
        floats = open_raster(write_geotiff(collar, tmp_path / "collar.tif"))
    kept, info = foreground_tiles(floats, tiles)
    assert set(t.index for t in overlapping) <= set(t.index for t in kept) and len(kept) <= len(overlapping) + 8
    assert 0.05 < info["data_fraction"] < 0.15
    with pytest.warns(UserWarning, match="all-nan.tif: no valid pixel .all nodata, NaN"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*scaled to 8 bits")
            assert foreground_tiles(open_raster(write_geotiff(collar * np.nan, tmp_path / "all-nan.tif")), tiles)[0] == []


def test_georeferencing_without_a_geotransform(tmp_path):
    """GCPs that one affine fits give that affine; a CRS alone, GCPs needing a warp and RPCs give pixel
    space (never pixel rows labelled as metres), each with a warning naming what was not used."""
    from affine import Affine
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.rpc import RPC

    truth = Affine(0.5, 0, 430000, 0, -0.5, 5420000)
    corners = [(0, 0), (0, 80), (64, 0), (64, 80), (32, 40)]

    def raster(name, **georef):
        path = tmp_path / f"{name}.tif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            write_geotiff(np.full((64, 80, 3), 90, np.uint8), path, crs=georef.pop("crs", None), transform=Affine.identity())
        with rasterio.open(path, "r+") as dataset:
            for key, value in georef.items():
                setattr(dataset, key, value)
        return path

    def gcps(shift=0.0):
        points = [GroundControlPoint(row=r, col=c, x=(truth * (c, r))[0], y=(truth * (c, r))[1]) for r, c in corners]
        points[-1] = GroundControlPoint(row=32, col=40 + shift, x=points[-1].x, y=points[-1].y)  # off the affine by `shift` px
        return points, CRS.from_epsg(32631)

    rpcs = RPC(height_off=0, height_scale=100, lat_off=48.8, lat_scale=0.01, line_num_coeff=[0, 0, -1] + [0] * 17,
               line_den_coeff=[1] + [0] * 19, line_off=32, line_scale=32, long_off=2.3, long_scale=0.01,
               samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19, samp_off=40, samp_scale=40)
    cases = {
        "fitted": (raster("fitted", gcps=gcps()), "georeferenced by its 5 GCPs, through the affine transform"),
        "warped": (raster("warped", gcps=gcps(shift=6.0)), "5 GCPs that no affine transform fits (largest residual"),
        "rpcs": (raster("rpcs", rpcs=rpcs), "georeferenced by RPCs only, which Seamline does not use"),
        "crs-only": (raster("crs-only", crs="EPSG:32631"), "georeferenced by a CRS (EPSG:32631) but no geotransform"),
    }
    for name, (path, message) in cases.items():
        with pytest.warns(UserWarning, match=re.escape(message)):
            source = open_raster(path)
        if name == "fitted":
            assert source.transform.almost_equals(truth) and CRS.from_wkt(source.crs_wkt).to_epsg() == 32631
        else:
            assert source.crs_wkt is None and source.transform.is_identity, name


def test_a_band_tagged_alpha_that_is_not_transparency_is_warned_about(tmp_path):
    """RGBN written as RGBA (ExtraSamples = alpha) masks every NIR = 0 pixel as no data: said, with
    how to clear the tag; a real alpha band (transparent or opaque) is read without a word."""
    import warnings

    from rasterio.enums import ColorInterp

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    for name, fourth, graded in (("rgbn.tif", rng.integers(0, 255, (200, 300, 1), dtype=np.uint8), True),
                                 ("rgba.tif", np.where(rng.random((200, 300, 1)) < 0.3, 0, 255).astype(np.uint8), False)):
        path = write_geotiff(np.dstack([rgb, fourth]), tmp_path / name)
        with rasterio.open(path, "r+") as dataset:
            dataset.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert open_raster(path).bands == (1, 2, 3)
        said = [str(w.message) for w in caught if "tagged alpha" in str(w.message)]
        assert said == ([f"{path}: band 4 is tagged alpha but 100% of its pixels are neither transparent nor opaque "
                         "(a near-infrared band tagged alpha?); its zero pixels are read as no data. If it is not "
                         "transparency, clear the tag (gdal_edit -colorinterp_4 undefined)"] if graded else [])


def test_a_world_file_image_takes_its_crs_from_its_prj(tmp_path):
    """A JPEG placed by a world file (.jgw) with its CRS in a .prj (ArcGIS exports): GDAL's JPEG
    driver reads the world file but not the .prj; the polygons would have had no CRS."""
    import pyproj

    path = tmp_path / "photo.jpg"
    with rasterio.open(path, "w", driver="JPEG", height=100, width=120, count=3, dtype="uint8") as dataset:
        dataset.write(np.random.default_rng(2).integers(0, 255, (3, 100, 120), dtype=np.uint8))
    (tmp_path / "photo.jgw").write_text("0.5\n0\n0\n-0.5\n500000.25\n4099999.75\n")
    (tmp_path / "photo.prj").write_text(pyproj.CRS.from_epsg(32633).to_wkt(version="WKT1_ESRI"))
    with pytest.warns(UserWarning, match=r"photo\.jpg: CRS read from photo\.prj"):
        source = open_raster(path)
    assert pyproj.CRS.from_wkt(source.crs_wkt).to_epsg() == 32633 and source.transform == rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4100000)
    (tmp_path / "photo.prj").write_text("not a CRS")
    with pytest.warns(UserWarning, match=r"photo\.prj: not a readable CRS"):
        assert open_raster(path).crs_wkt is None
