import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grid import TileGrid, TileGridError, axis_windows


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    tile=st.sampled_from([64, 128, 256, 512]),
    overlap_fraction=st.floats(0, 0.49),
)
def test_cores_partition_the_image_and_windows_keep_their_size(height, width, tile, overlap_fraction):
    overlap = int(tile * overlap_fraction)
    grid = TileGrid(height, width, tile, overlap)
    cover = np.zeros((height, width), np.int32)
    for t in grid.tiles:
        assert t.rows.length == min(tile, height) and t.cols.length == min(tile, width)
        assert t.rows.start <= t.core_rows.start < t.core_rows.stop <= t.rows.stop
        assert t.cols.start <= t.core_cols.start < t.core_cols.stop <= t.cols.stop
        cover[t.core_rows.start : t.core_rows.stop, t.core_cols.start : t.core_cols.stop] += 1
    assert (cover == 1).all()
    assert len(grid.tiles) == len(grid)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(65, 5000), tile=st.sampled_from([64, 128, 512]), overlap=st.integers(0, 31))
def test_neighbours_overlap_at_least_as_asked(size, tile, overlap):
    windows = axis_windows(size, tile, overlap)
    assert windows[0].start == 0 and windows[-1].stop == size
    for a, b in zip(windows, windows[1:]):
        assert a.stop - b.start >= overlap
        assert b.start > a.start


def test_shared_edges_and_exclusive_zone():
    grid = TileGrid(1000, 1200, 512, 64)
    tiles = {(t.row, t.col): t for t in grid.tiles}
    first, last = tiles[(0, 0)], tiles[max(tiles)]
    assert first.interior == (False, False, True, True)
    assert last.interior == (True, True, False, False)
    right = tiles[(0, 1)]
    assert first.shared[2] == first.cols.stop - right.cols.start
    x0, y0, x1, y1 = first.exclusive_bounds
    assert (x0, y0) == (0, 0) and x1 == right.cols.start


@pytest.mark.parametrize("args", [(0, 10, 512, 64), (100, 100, 512, 300), (100, 100, 64, -1), (100, 100, 0, 0)])
def test_absurd_parameters_are_refused(args):
    with pytest.raises(TileGridError):
        TileGrid(*args)


@pytest.mark.parametrize("height, width, tile, overlap", [(1000, 700, 256, 32), (300, 5000, 512, 64), (100, 100, 512, 64)])
def test_a_tile_built_alone_is_the_same_tile_as_in_the_whole_grid(height, width, tile, overlap):
    grid = TileGrid(height, width, tile, overlap)
    assert [grid.tile(t.index) for t in grid.tiles] == grid.tiles
    with pytest.raises(IndexError):
        grid.tile(len(grid))


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 20_000), width=st.integers(1, 4000), min_tiles=st.integers(1, 200))
def test_row_bands_cover_the_rows_once_and_taper_to_one_row(height, width, min_tiles):
    grid = TileGrid(height, width, 256, 32)
    n_rows, n_cols = grid.shape
    bands = grid.row_bands(min_tiles)
    assert [b.start for b in bands] == [0, *[b.stop for b in bands[:-1]]] and bands[-1].stop == n_rows
    full_rows = -(-min_tiles // n_cols)
    sizes = [b.length for b in bands]
    assert max(sizes) <= full_rows  # memory holds at most a band of min_tiles
    tapered = [s for s in sizes if s < full_rows]
    assert tapered == sorted(tapered, reverse=True) and sizes[-1] == 1
    assert all(s == full_rows for s in sizes[: len(sizes) - len(tapered)])
    assert n_rows < 2 * full_rows or sum(tapered) < 2 * full_rows  # only the rows below the last full band taper
