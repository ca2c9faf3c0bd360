"""A column store of detected instances: Shapely polygons plus per-instance attributes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import shapely


@dataclass
class Detections:
    """Instances in level-0 pixel coordinates of the whole image (x = column, y = row).

    ``cut``: its mask or box comes within ``pipeline.segment.EDGE_BAND`` px of an interior edge of its
    tile's window. ``owned``: the centre of its box lies in its tile's core. Both matter only to the
    seam merge.
    """

    geometry: np.ndarray
    label: np.ndarray
    score: np.ndarray
    tile: np.ndarray
    cut: np.ndarray
    owned: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(
            geometry=np.empty(0, object),
            label=np.empty(0, np.int16),
            score=np.empty(0, np.float32),
            tile=np.empty(0, np.int32),
            cut=np.empty(0, bool),
            owned=np.empty(0, bool),
        )

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, index: np.ndarray) -> "Detections":
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.score)

    @property
    def bounds(self) -> np.ndarray:
        """(n, 4) array of (xmin, ymin, xmax, ymax)."""
        return shapely.bounds(self.geometry).reshape(-1, 4)

    def __getstate__(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["geometry"] = shapely.to_wkb(self.geometry)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["geometry"] = shapely.from_wkb(state["geometry"])
        for name, value in state.items():
            setattr(self, name, value)
