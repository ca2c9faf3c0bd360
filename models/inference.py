"""Run a Mask R-CNN on batches of tiles and return box-local instance masks.

torchvision's own post-processing pastes every mask into a full-tile float image (hundreds of
tile-sized arrays for dense nuclei); here each mask is resized only inside its own box.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection import MaskRCNN

from models.builders import build_model
from models.card import ModelCard, load_card
from models.tta import flip_tta
from models.weights import load_weights


@dataclass(frozen=True)
class MaskCrop:
    """A binary mask covering rows ``row:row+h`` and columns ``col:col+w`` of its tile."""

    row: int
    col: int
    mask: np.ndarray


@dataclass
class TileInstances:
    """Detections in one tile, in tile pixel coordinates; ``labels`` index ``card.classes``."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: list[MaskCrop]

    def __len__(self) -> int:
        return len(self.scores)


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise; ``SEAMLINE_DEVICE`` overrides."""
    name = os.environ.get("SEAMLINE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Segmenter:
    """A model loaded once, ready to segment uint8 tiles of shape (batch, height, width, channels)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None, flips: bool | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.card: ModelCard = load_card(self.model_dir)
        self.flips = self.card.test_time_flips if flips is None else flips  # models/tta.py
        self.device = torch.device(device) if device is not None else default_device()
        model = build_model(self.card)
        load_weights(model, self.model_dir / self.card.weights, f"{self.card.architecture} with {len(self.card.classes)} classes")
        # channels-last convolutions: 8–9 % less time per tile on this CPU (BENCHMARKS.md); CUDA unmeasured, left as is
        memory_format = torch.channels_last if self.device.type == "cpu" else torch.preserve_format
        self.model = model.eval().to(self.device, memory_format=memory_format)
        # CUDA: one batch at a time (batches are the parallelism there); CPU: threads infer side by
        # side, each on its own core (2 threads × 1 torch thread ran 2.1× one thread, BENCHMARKS.md)
        self._lock = threading.Lock() if self.device.type == "cuda" else contextlib.nullcontext()
        self.max_batch: int | None = None  # set by a CUDA out-of-memory error: the largest batch since tried

    def __call__(self, tiles: np.ndarray) -> list[TileInstances]:
        """Instances of each tile. CUDA runs the batch in one forward pass (autocast), in halves
        (and from then on no larger) when it runs out of GPU memory; the CPU runs tiles one by one:
        batching gained nothing measurable there (BENCHMARKS.md)."""
        if tiles.ndim != 4 or tiles.dtype != np.uint8:
            raise ValueError(f"expected uint8 tiles shaped (batch, h, w, c), got {tiles.dtype} {tiles.shape}")
        if self.device.type != "cuda":
            return [found for start in range(len(tiles)) for found in self._forward(tiles[start : start + 1])]
        found: list[TileInstances] = []
        while len(found) < len(tiles):
            part = tiles[len(found) : len(found) + (self.max_batch or len(tiles))]
            try:
                found += self._forward(part)
            except torch.cuda.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                if len(part) == 1:
                    raise MemoryError(f"{self.card.name}: one {part.shape[1]}x{part.shape[2]} tile does not fit in the "
                                      f"memory of {self.device} ({err}); use a smaller --tile-size") from err
                self.max_batch = len(part) // 2
        return found

    @torch.inference_mode()
    def _forward(self, tiles: np.ndarray) -> list[TileInstances]:
        height, width = tiles.shape[1:3]
        with self._lock:  # the device's share: the model, masks pasted and thresholded, results copied to the host
            batch = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
            images = list(batch.permute(0, 3, 1, 2).float().div_(255))
            model = self.model_for(height, width)
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                if self.flips:
                    detections = flip_tta(model, images, self.card.score_threshold)
                else:
                    image_list, _ = model.transform(images)
                    features = model.backbone(image_list.tensors)
                    proposals, _ = model.rpn(image_list, features)
                    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
            fetched = [self._fetch(d, height, width) for d in detections]
        return [self._select(f) for f in fetched]  # host work: the device is free for another thread's batch

    def model_for(self, height: int, width: int) -> MaskRCNN:
        """The model with its caps on proposals and detections, set for the card's tile, scaled to a
        larger tile's area (a tile of four times the area holds about four times the objects; unscaled,
        `--tile-size 1024` lost nuclei to them). A view sharing the weights: the model is not changed."""
        scale = height * width / self.card.tile_size**2
        if scale <= 1:
            return self.model
        rpn, heads = copy.copy(self.model.rpn), copy.copy(self.model.roi_heads)
        rpn._pre_nms_top_n = {k: math.ceil(v * scale) for k, v in rpn._pre_nms_top_n.items()}
        rpn._post_nms_top_n = {k: math.ceil(v * scale) for k, v in rpn._post_nms_top_n.items()}
        heads.detections_per_img = math.ceil(heads.detections_per_img * scale)
        view = copy.copy(self.model)
        view._modules = {**self.model._modules, "rpn": rpn, "roi_heads": heads}
        return view

    def _fetch(self, det: dict[str, torch.Tensor], height: int, width: int) -> TileInstances:
        """One tile's detections on the host, masks pasted into their boxes (on the model's device)."""
        boxes = det["boxes"].float()
        crops = paste_masks_in_boxes(det["masks"].float(), boxes, height, width, self.card.mask_threshold)
        labels = (det["labels"] - 1).cpu().numpy().astype(np.int16)
        return TileInstances(boxes=boxes.cpu().numpy(), labels=labels, scores=det["scores"].float().cpu().numpy(), masks=crops)

    def _select(self, found: TileInstances) -> TileInstances:
        """``found`` without its empty masks and, with the card's mask NMS, without masks another covers."""
        keep = np.array([i for i, c in enumerate(found.masks) if c.mask.any()], np.int64)
        if self.card.mask_nms_threshold is not None and len(keep):
            kept = [found.masks[i] for i in keep]
            classes = np.zeros_like(found.labels[keep]) if self.card.mask_nms_across_classes else found.labels[keep]
            keep = keep[mask_nms(kept, classes, found.scores[keep], self.card.mask_nms_threshold, self.card.mask_nms_metric)]
        return TileInstances(
            boxes=found.boxes[keep], labels=found.labels[keep], scores=found.scores[keep], masks=[found.masks[i] for i in keep]
        )


PASTE_CHUNK_PIXELS = 1 << 22  # masks are resampled together, up to this many output pixels at a time


def paste_masks_in_boxes(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float
) -> list[MaskCrop]:
    """Resize each (1, M, M) mask probability map into its box and threshold it, box-locally.

    torchvision's Mask R-CNN learns its masks through ``roi_align(aligned=False)``: the target for
    a box ``x0..x1`` (pixel edges, as the boxes are) is the mask sampled at *centre* positions
    ``x0..x1`` (pixel ``i`` centred on ``i``), half a pixel right of the box. So the map is read
    back the same way: each pixel whose centre lies in the box takes the map's bilinear value at
    its own centre position (edge cells extended to the box's edge). torchvision's own
    ``paste_masks_in_image`` stretches the map over the box's edges instead, which puts every mask
    half a pixel up and left of its object and about a pixel wider. Never allocates a full-tile
    image per instance.
    """
    if len(masks) == 0:
        return []
    boxes = boxes.float()
    cells = masks.shape[-1]
    first = torch.stack([torch.ceil(boxes[:, 0] - 0.5), torch.ceil(boxes[:, 1] - 0.5)], 1).clamp_(min=0)
    last = torch.stack([torch.floor(boxes[:, 2] - 0.5).clamp(max=width - 1), torch.floor(boxes[:, 3] - 0.5).clamp(max=height - 1)], 1)
    sizes = (last - first + 1).clamp_(min=0).long()  # (N, 2): columns, rows
    step = (boxes[:, 2:] - boxes[:, :2]).clamp_(min=1e-3) / cells
    crops: list[MaskCrop] = [MaskCrop(0, 0, np.zeros((0, 0), bool))] * len(masks)
    areas, order = torch.sort(sizes.prod(1))  # small masks first
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * int(areas[stop]) <= PASTE_CHUNK_PIXELS:
            stop += 1
        chunk, start = order[start:stop].tolist(), stop
        index = torch.tensor(chunk, device=masks.device)
        span_x, span_y = (int(v) for v in sizes[index].amax(0))
        if not span_x or not span_y:
            continue
        # each output pixel's position in its map's cells (cell k centred on k), as grid_sample's -1..1
        columns = (first[index, :1] + torch.arange(span_x, device=masks.device) - boxes[index, :1]) / step[index, :1] - 0.5
        rows = (first[index, 1:] + torch.arange(span_y, device=masks.device) - boxes[index, 1:2]) / step[index, 1:] - 0.5
        grid = torch.stack(torch.broadcast_tensors(columns[:, None, :], rows[:, :, None]), -1) * (2 / cells) + (1 / cells - 1)
        pasted = F.grid_sample(masks[index].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
        pasted = (pasted > threshold).cpu().numpy()
        for k, i in enumerate(chunk):
            w, h = sizes[i].tolist()
            if w and h:
                crops[i] = MaskCrop(int(first[i, 1]), int(first[i, 0]), pasted[k, :h, :w])
    return crops


def mask_nms(
    crops: list[MaskCrop], labels: np.ndarray, scores: np.ndarray, threshold: float, metric: str = "iou"
) -> np.ndarray:
    """Indices (in input order) of the masks kept by greedy mask NMS: in score order, a mask goes
    when its overlap with a kept mask of the same class reaches ``threshold``; overlap is IoU, or
    with ``metric="ios"`` intersection over the smaller mask. Each mask is judged by its largest
    4-connected region, the part its polygon keeps (``pipeline.polygons``)."""
    crops = [largest_region(c) for c in crops]
    n = len(crops)
    top = np.array([c.row for c in crops])
    left = np.array([c.col for c in crops])
    bottom = top + np.array([c.mask.shape[0] for c in crops])
    right = left + np.array([c.mask.shape[1] for c in crops])
    area = np.array([c.mask.sum() for c in crops])
    overlaps = (
        (np.maximum(top[:, None], top) < np.minimum(bottom[:, None], bottom))
        & (np.maximum(left[:, None], left) < np.minimum(right[:, None], right))
        & (labels[:, None] == labels)
    )
    np.fill_diagonal(overlaps, False)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    suppressed = np.zeros(n, bool)
    for i in order:
        if suppressed[i]:
            continue
        for j in np.flatnonzero(overlaps[i] & ~suppressed & (rank > rank[i])):
            r0, r1 = max(top[i], top[j]), min(bottom[i], bottom[j])
            c0, c1 = max(left[i], left[j]), min(right[i], right[j])
            a = crops[i].mask[r0 - top[i] : r1 - top[i], c0 - left[i] : c1 - left[i]]
            b = crops[j].mask[r0 - top[j] : r1 - top[j], c0 - left[j] : c1 - left[j]]
            inter = np.count_nonzero(a & b)
            base = min(area[i], area[j]) if metric == "ios" else area[i] + area[j] - inter
            if inter and inter / base >= threshold:
                suppressed[j] = True
    return np.flatnonzero(~suppressed)


def largest_region(crop: MaskCrop) -> MaskCrop:
    """The crop with only its largest 4-connected region (ties: the first in raster order)."""
    regions, count = ndimage.label(crop.mask)
    if count <= 1:
        return crop
    return MaskCrop(crop.row, crop.col, regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1)


_loading = threading.Lock()


def cached_segmenter(model_dir: str, device: str | None = None, flips: bool | None = None) -> Segmenter:
    """One ``Segmenter`` per model (and flip setting) and process: Dask workers load a model once
    and reuse it, also when all their threads ask for it at the first tasks."""
    with _loading:
        return _segmenter(model_dir, device, flips)


@lru_cache(maxsize=4)
def _segmenter(model_dir: str, device: str | None, flips: bool | None) -> Segmenter:
    return Segmenter(model_dir, device, flips)
