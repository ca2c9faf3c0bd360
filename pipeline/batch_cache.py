"""Completed tile batches on disk, so an interrupted image resumes where it stopped.

A batch result is stored as ``.npz`` arrays only (geometry as concatenated WKB with offsets), so
loading it never unpickles anything; files are written under a temporary name and renamed.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np
import shapely

from pipeline.detections import Detections

_FIELDS = ("label", "score", "tile", "cut", "owned")


def _pack(prefix: str, detections: Detections) -> dict[str, np.ndarray]:
    wkb = shapely.to_wkb(detections.geometry) if len(detections) else np.empty(0, object)
    lengths = np.fromiter((len(b) for b in wkb), np.int64, len(wkb))
    arrays = {f"{prefix}_{name}": getattr(detections, name) for name in _FIELDS}
    arrays[f"{prefix}_wkb"] = np.frombuffer(b"".join(wkb), np.uint8)
    arrays[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(lengths)])
    return arrays


def _unpack(prefix: str, data) -> Detections:
    blob, offsets = data[f"{prefix}_wkb"].tobytes(), data[f"{prefix}_offsets"]
    wkb = np.array([blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])], dtype=object)
    geometry = shapely.from_wkb(wkb) if len(wkb) else np.empty(0, object)
    return Detections(geometry=geometry, **{name: data[f"{prefix}_{name}"] for name in _FIELDS})


def save_batch(path: Path, result) -> None:
    """Write a ``BatchResult`` to ``path`` atomically."""
    buffer = io.BytesIO()
    np.savez(
        buffer, **_pack("final", result.final), **_pack("candidates", result.candidates),
        counts=np.array([result.tiles_segmented, result.tiles_skipped], np.int64), seconds=np.array([result.seconds]),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_batch(path: Path):
    """The ``BatchResult`` saved at ``path`` (arrays only, ``allow_pickle=False``)."""
    from pipeline.stages import BatchResult

    with np.load(path, allow_pickle=False) as data:
        segmented, skipped = data["counts"].tolist()
        seconds = float(data["seconds"][0]) if "seconds" in data.files else 0.0  # kept by an older version: unknown
        return BatchResult(_unpack("final", data), _unpack("candidates", data), segmented, skipped, seconds)
