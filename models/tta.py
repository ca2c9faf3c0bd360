"""Flip test-time augmentation for a torchvision Mask R-CNN (detectron2's TTA recipe, fused as WBF).

Each tile is seen four times: as is, mirrored left-right, upside down, and both. Detections of
all views are mapped back to the tile and fused: box NMS picks one detection per object, the
object's score is the mean over views of each view's best matching score (a view that missed it
adds 0), its box the score-weighted mean of the matches. The mask head then runs on the fused
box in every view and the probability maps are averaged. The card's score threshold applies to
the fused score, so an object most views missed falls below it.
"""

from __future__ import annotations

import copy

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.ops import batched_nms, box_iou

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, up-down)
VIEW_SCORE_FLOOR = 0.05  # per-view detections kept for fusion (the fused score is then thresholded)


def _flip(pixels: torch.Tensor, lr: bool, ud: bool) -> torch.Tensor:
    """Images or mask maps (..., H, W) under a flip."""
    dims = [d for d, on in ((-1, lr), (-2, ud)) if on]
    return pixels.flip(dims) if dims else pixels


def _flip_boxes(boxes: torch.Tensor, lr: bool, ud: bool, height: float, width: float) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) under the same flip (the flip is its own inverse) of an image
    ``height`` × ``width`` in the boxes' coordinates."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    if lr:
        x0, x1 = width - x1, width - x0
    if ud:
        y0, y1 = height - y1, height - y0
    return torch.stack([x0, y0, x1, y1], -1)


def _fuse(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, view: torch.Tensor,
          iou_threshold: float, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One detection per object from the detections of all views of one tile."""
    boxes, scores = boxes.float(), scores.float()  # autocast may hand over half precision
    if len(boxes) == 0:
        return boxes, scores, labels
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:limit]
    overlap = box_iou(boxes[keep], boxes) * (labels[keep, None] == labels)
    overlap[torch.arange(len(keep)), keep] = 2.0  # a kept detection belongs to itself
    best = overlap.max(0)
    member = best.values >= iou_threshold  # others go to the kept box they overlap most
    owner = best.indices[member]
    views = len(FLIPS)
    # each view's best matching score per object (0 where the view missed it)
    per_view = torch.zeros(len(keep) * views, device=boxes.device)
    per_view = per_view.scatter_reduce(0, owner * views + view[member], scores[member], "amax").view(-1, views)
    weight = torch.zeros(len(keep), device=boxes.device).index_add_(0, owner, scores[member])
    fused_boxes = torch.zeros(len(keep), 4, device=boxes.device).index_add_(0, owner, boxes[member] * scores[member, None])
    return fused_boxes / weight[:, None], per_view.mean(1), labels[keep]


@torch.inference_mode()
def flip_tta(model: MaskRCNN, images: list[torch.Tensor], score_threshold: float) -> list[dict[str, torch.Tensor]]:
    """``model``'s eval output (boxes, labels, scores, masks (N, 1, M, M) probabilities) for the
    images (C, H, W, values 0-1, all of one size), fused over the four flips."""
    # this call's own view of the heads with a lower score floor: the model itself is never changed,
    # since worker threads run one shared model side by side
    heads = copy.copy(model.roi_heads)
    heads.score_thresh = min(VIEW_SCORE_FLOOR, score_threshold)
    height, width = images[0].shape[-2:]
    seen, detections = [], []
    stacked = torch.stack(images)
    for lr, ud in FLIPS:
        image_list, _ = model.transform(list(_flip(stacked, lr, ud)))
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
        logits, regression = heads.box_predictor(box_features)
        boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals, image_list.image_sizes)
        seen.append((features, image_list.image_sizes))
        detections.append([(_flip_boxes(b, lr, ud, height, width), s, l) for b, s, l in zip(boxes, scores, labels)])
    fused = []
    for i in range(len(images)):
        parts = [detections[v][i] for v in range(len(FLIPS))]
        view = torch.cat([torch.full((len(p[1]),), v, dtype=torch.int64, device=p[1].device) for v, p in enumerate(parts)])
        boxes, scores, labels = _fuse(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                      torch.cat([p[2] for p in parts]), view, heads.nms_thresh, heads.detections_per_img)
        keep = scores >= score_threshold
        fused.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    masks = [None] * len(images)
    for (lr, ud), (features, sizes) in zip(FLIPS, seen):
        # the mask head samples its box at pixel centres (roi_align, aligned=False: pixel i centred on
        # i), which a flip maps i → width - 1 - i: so each view's map covers the same pixels as the
        # first view's and the four average cell for cell (boxes, on pixel edges, flip by width)
        view_boxes = [_flip_boxes(f["boxes"], lr, ud, height - 1, width - 1) for f in fused]
        mask_features = heads.mask_head(heads.mask_roi_pool(features, view_boxes, sizes))
        logits = heads.mask_predictor(mask_features)
        labels = torch.cat([f["labels"] for f in fused])
        probabilities = logits[torch.arange(len(labels), device=labels.device), labels].sigmoid()[:, None]
        for i, part in enumerate(probabilities.split([len(f["labels"]) for f in fused])):
            part = _flip(part, lr, ud)
            masks[i] = part if masks[i] is None else masks[i] + part
    for f, m in zip(fused, masks):
        f["masks"] = m / len(FLIPS)
    return fused
