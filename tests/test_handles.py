import threading

import numpy as np
import pytest
from rasterio.env import get_gdal_config, set_gdal_config

from pipeline.grid import Span
from pipeline.handles import HANDLES_PER_THREAD, open_cached
from pipeline.sources import GDAL_BLOCK_CACHE, SourceError, _bound_block_cache, open_raster, read_window
from pipeline.synthetic_raster import write_geotiff


class Opened:
    """A stand-in file handle that records its opening and closing."""

    log: list = []

    def __init__(self, path: str) -> None:
        self.path, self.closed = path, False
        Opened.log.append(("open", path))

    def close(self) -> None:
        self.closed = True
        Opened.log.append(("close", self.path))


@pytest.fixture
def files(tmp_path):
    Opened.log = []
    paths = [tmp_path / f"{i}.bin" for i in range(HANDLES_PER_THREAD + 1)]
    for path in paths:
        path.write_bytes(b"x")
    return [str(p) for p in paths]


def test_reads_of_one_file_share_one_handle_per_thread(files):
    handles = []
    for _ in range(3):
        with open_cached(files[0], Opened) as handle:
            handles.append(handle)
    assert handles[0] is handles[1] is handles[2] and not handles[0].closed

    other = []
    thread = threading.Thread(target=lambda: other.append(open_cached(files[0], Opened).__enter__()))
    thread.start()
    thread.join()
    assert other[0] is not handles[0]  # GDAL and tifffile handles must not cross threads


def test_the_least_recently_used_handle_is_closed(files):
    with open_cached(files[0], Opened) as first:
        pass
    for path in files[1:]:
        with open_cached(path, Opened):
            pass
    assert first.closed
    assert Opened.log.count(("close", files[0])) == 1


def test_a_handle_whose_read_failed_is_dropped(files):
    with pytest.raises(OSError):
        with open_cached(files[0], Opened) as broken:
            raise OSError("truncated")
    assert broken.closed
    with open_cached(files[0], Opened) as fresh:
        assert fresh is not broken


def test_a_file_rewritten_on_disk_is_read_afresh(tmp_path):
    path = tmp_path / "scene.tif"
    window = (Span(0, 300), Span(0, 300))
    write_geotiff(np.full((300, 300, 3), 10, np.uint8), path)
    source = open_raster(path)
    assert (read_window(source, *window)[0] == 10).all()
    rng = np.random.default_rng(0)
    write_geotiff(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), path)  # another size on disk
    pixels, _ = read_window(source, *window)
    assert not (pixels == 10).all()


@pytest.mark.parametrize("user_setting", [None, "1024"])
def test_gdal_block_cache_is_bounded_unless_the_user_sets_it(tmp_path, monkeypatch, user_setting):
    """Kept handles hold their decoded blocks: GDAL's default cache (5 % of RAM) let a 20k² run grow by 1.2 GB."""
    path = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "a.tif")
    if user_setting is None:
        monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    else:
        monkeypatch.setenv("GDAL_CACHEMAX", user_setting)
    _bound_block_cache.cache_clear()
    set_gdal_config("GDAL_CACHEMAX", 2**30)
    try:
        read_window(open_raster(path), Span(0, 64), Span(0, 64))
        expected = GDAL_BLOCK_CACHE if user_setting is None else 2**30
        assert get_gdal_config("GDAL_CACHEMAX") == expected
    finally:
        set_gdal_config("GDAL_CACHEMAX", GDAL_BLOCK_CACHE)
        _bound_block_cache.cache_clear()


def test_a_file_gone_since_it_was_opened_fails_with_its_name(tmp_path):
    path = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "gone.tif")
    source = open_raster(path)
    read_window(source, Span(0, 32), Span(0, 32))
    path.unlink()
    with pytest.raises(SourceError, match="gone.tif: read failed"):
        read_window(source, Span(0, 32), Span(0, 32))
