"""Open image files kept per thread, so the tiles of one image reuse one reader.

Reopening a GeoTIFF or a slide for every window throws away the decoder's block cache: a 512²
window at a 448 px stride decodes 9 blocks of 256², and a neighbouring tile decodes a third of them
again (13 ms against 4 ms per tile, BENCHMARKS.md). Each Dask worker thread keeps its own few
handles (GDAL and tifffile handles must not be shared between threads); a file changed on disk
(size or modification time) is opened afresh, and a handle that failed a read is dropped.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

Handle = TypeVar("Handle")

HANDLES_PER_THREAD = 2
_local = threading.local()


@contextmanager
def open_cached(path: str, opener: Callable[[str], Handle]) -> Iterator[Handle]:
    """This thread's open handle of ``path`` from ``opener`` (opened on first use); the least
    recently used handle beyond ``HANDLES_PER_THREAD`` is closed."""
    cache: OrderedDict = _local.__dict__.setdefault("handles", OrderedDict())
    stat = os.stat(path)
    key = (opener, path, stat.st_size, stat.st_mtime_ns)
    handle = cache.pop(key, None)
    if handle is None:
        handle = opener(path)
    try:
        yield handle
    except BaseException:
        handle.close()
        raise
    cache[key] = handle
    while len(cache) > HANDLES_PER_THREAD:
        cache.popitem(last=False)[1].close()

