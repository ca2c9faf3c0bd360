"""The tile grid: overlapping windows whose cores partition the image exactly.

Along each axis, the fewest full-size windows whose overlaps are at least ``overlap`` are spread
evenly from border to border, so every window has the full tile size (unless the image is smaller
than a tile). Each seam's core boundary lies in the middle of the overlap between two windows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A half-open interval ``[start, stop)`` of pixel indices."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Tile:
    """One window of the grid, in level-0 pixels of the whole image.

    ``window`` spans are what is read; ``core`` spans are the tile's exclusive share of the image.
    ``interior`` flags, in order (left, top, right, bottom), say whether a window edge touches
    a neighbouring tile rather than the image border; ``shared`` gives, for each such edge, how
    many pixels of the window a neighbour also reads (0 at the image border).
    """

    index: int
    row: int
    col: int
    rows: Span
    cols: Span
    core_rows: Span
    core_cols: Span
    shared: tuple[int, int, int, int]

    @property
    def interior(self) -> tuple[bool, bool, bool, bool]:
        return tuple(s > 0 for s in self.shared)  # type: ignore[return-value]

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Window as (col_min, row_min, col_max, row_max)."""
        return self.cols.start, self.rows.start, self.cols.stop, self.rows.stop

    @property
    def core_bounds(self) -> tuple[int, int, int, int]:
        return self.core_cols.start, self.core_rows.start, self.core_cols.stop, self.core_rows.stop

    @property
    def exclusive_bounds(self) -> tuple[int, int, int, int]:
        """The part of the window that no other window reads."""
        left, top, right, bottom = self.shared
        return self.cols.start + left, self.rows.start + top, self.cols.stop - right, self.rows.stop - bottom


class TileGridError(ValueError):
    """Tiling parameters that cannot describe a grid."""


def axis_windows(size: int, tile: int, overlap: int) -> list[Span]:
    """Window spans along one axis of ``size`` pixels."""
    if size <= 0:
        raise TileGridError(f"image axis has {size} pixels")
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise TileGridError(f"tile size {tile} and overlap {overlap}: need tile > overlap >= 0")
    if size <= tile:
        return [Span(0, size)]
    count = -(-(size - overlap) // (tile - overlap))
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [Span(s, s + tile) for s in starts]


def axis_cores(windows: list[Span]) -> list[Span]:
    """Core spans: each seam split in the middle of the two windows' overlap."""
    cuts = [w.start for w in windows[1:]]
    ends = [w.stop for w in windows[:-1]]
    middles = [(start + stop) // 2 for start, stop in zip(cuts, ends)]
    edges = [windows[0].start, *middles, windows[-1].stop]
    return [Span(a, b) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class TileGrid:
    """All tiles of an image of ``height`` × ``width`` pixels, row-major."""

    height: int
    width: int
    tile_size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.overlap * 2 >= self.tile_size:
            raise TileGridError(f"overlap {self.overlap} must be less than half the tile size {self.tile_size}")
        axis_windows(self.height, self.tile_size, self.overlap)
        axis_windows(self.width, self.tile_size, self.overlap)

    @property
    def tiles(self) -> list[Tile]:
        axes = self._axes()
        return [self._tile(axes, r, c) for r in range(len(axes[0])) for c in range(len(axes[2]))]

    def tile(self, index: int) -> Tile:
        """The ``index``-th tile (row-major), built alone: tasks get indices, not tile lists."""
        axes = self._axes()
        if not 0 <= index < len(axes[0]) * len(axes[2]):
            raise IndexError(f"tile {index} of a grid of {len(axes[0]) * len(axes[2])}")
        return self._tile(axes, *divmod(index, len(axes[2])))

    @property
    def shape(self) -> tuple[int, int]:
        """Tile rows and tile columns."""
        rows, _, cols, _ = self._axes()
        return len(rows), len(cols)

    def tiles_in_rows(self, rows: Span) -> list[Tile]:
        """The tiles of tile rows ``rows`` (clipped to the grid), row-major."""
        axes = self._axes()
        return [self._tile(axes, r, c) for r in range(max(rows.start, 0), min(rows.stop, len(axes[0]))) for c in range(len(axes[2]))]

    def row_top(self, row: int) -> int:
        """First pixel row of tile row ``row``'s windows."""
        return self._axes()[0][row].start

    def row_bands(self, min_tiles: int) -> list[Span]:
        """Consecutive spans of tile rows, top to bottom: the units an image is merged and written in.
        Each is the fewest whole rows that hold ``min_tiles`` tiles, except at the bottom, where the
        rows of the last band (and of a short one after it) are halved, then halved again (7 rows:
        4, 2, 1): once the last tile is segmented, one row is left to merge and write, not a band."""
        n_rows, n_cols = self.shape
        step = max(1, -(-min_tiles // n_cols))
        start = max(n_rows // step - 1, 0) * step
        bands = [Span(r, r + step) for r in range(0, start, step)]
        while start < n_rows:
            size = -(-(n_rows - start) // 2)
            bands.append(Span(start, start + size))
            start += size
        return bands

    def _axes(self) -> tuple[list[Span], list[Span], list[Span], list[Span]]:
        rows = axis_windows(self.height, self.tile_size, self.overlap)
        cols = axis_windows(self.width, self.tile_size, self.overlap)
        return rows, axis_cores(rows), cols, axis_cores(cols)

    @staticmethod
    def _tile(axes, r: int, c: int) -> Tile:
        row_windows, row_cores, col_windows, col_cores = axes
        rows, cols = row_windows[r], col_windows[c]
        top = row_windows[r - 1].stop - rows.start if r > 0 else 0
        bottom = rows.stop - row_windows[r + 1].start if r + 1 < len(row_windows) else 0
        left = col_windows[c - 1].stop - cols.start if c > 0 else 0
        right = cols.stop - col_windows[c + 1].start if c + 1 < len(col_windows) else 0
        index = r * len(col_windows) + c
        return Tile(index, r, c, rows, cols, row_cores[r], col_cores[c], (left, top, right, bottom))

    def __len__(self) -> int:
        return len(axis_windows(self.height, self.tile_size, self.overlap)) * len(
            axis_windows(self.width, self.tile_size, self.overlap)
        )
