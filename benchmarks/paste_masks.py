"""Mask pasting, torchvision's against Seamline's: where the masks land, and how long it takes.

torchvision's Mask R-CNN learns its 28×28 mask maps through ``roi_align(aligned=False)``, which
samples a box at pixel-centre positions. Masks of generated ellipses are made into maps exactly that
way (``project_masks_on_boxes``, the training targets) and pasted back into their boxes by
torchvision's ``paste_masks_in_image``, by Seamline's box-local paste before 2026-12-03 (torchvision's
mapping, one resize per mask; kept here for comparison) and by ``models.inference.paste_masks_in_boxes``;
the pasted masks are compared with the ellipses (IoU, centroid offset). Then one tile's worth of random maps
(``--masks`` of them, 8–38 px boxes in a 512² tile) is pasted both ways, interleaved, medians of
``--repeats``.

    python benchmarks/paste_masks.py [--masks 300] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image, project_masks_on_boxes

from common import machine, table
from models.inference import paste_masks_in_boxes

TILE = 512


def paste_before(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float) -> list:
    """Seamline's paste until 2026-12-03: torchvision's mapping (padded map over whole-pixel box edges), box-local."""
    masks, scale = expand_masks(masks, padding=1)
    crops = []
    for mask, (x0, y0, x1, y1) in zip(masks, expand_boxes(boxes, scale).to(torch.int64).tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
        crops.append((cy0, cx0, (resized[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > threshold).numpy()))
    return crops


def ellipses(n: int, rng: np.random.Generator):
    """``n`` (mask, box) pairs: ellipses 4–15 px in radius, boxes on their pixel edges (as in training)."""
    yy, xx = np.mgrid[:128, :128]
    for _ in range(n):
        (cy, cx), radius, squash = rng.uniform(30, 98, 2), rng.uniform(4, 15), rng.uniform(0.6, 1.0)
        mask = ((yy - cy) / squash) ** 2 + (xx - cx) ** 2 <= radius**2
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        yield mask, torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=torch.float32)


def accuracy(n: int) -> list[list]:
    scores = {"torchvision": ([], []), "seamline": ([], [])}
    for mask, box in ellipses(n, np.random.default_rng(0)):
        target = project_masks_on_boxes(torch.from_numpy(mask)[None].float(), box, torch.tensor([0]), 28)[:, None]
        pasted = {"torchvision": paste_masks_in_image(target, box, (128, 128), padding=1)[0, 0].numpy() > 0.5}
        (crop,) = paste_masks_in_boxes(target, box, 128, 128, 0.5)
        pasted["seamline"] = np.zeros((128, 128), bool)
        pasted["seamline"][crop.row : crop.row + crop.mask.shape[0], crop.col : crop.col + crop.mask.shape[1]] = crop.mask
        for name, found in pasted.items():
            scores[name][0].append((found & mask).sum() / (found | mask).sum())
            scores[name][1].append(np.argwhere(found).mean(0) - np.argwhere(mask).mean(0))
    return [[name, f"{np.mean(iou):.3f}", f"{np.min(iou):.3f}", f"{np.mean(offset, 0)[0]:+.2f}", f"{np.mean(offset, 0)[1]:+.2f}"]
            for name, (iou, offset) in scores.items()]


def timing(n: int, repeats: int) -> list[list]:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(n, 1, 28, 28, generator=gen)
    corners = torch.rand(n, 2, generator=gen) * (TILE - 40)
    boxes = torch.cat([corners, corners + 8 + torch.rand(n, 2, generator=gen) * 30], 1)
    runs = {
        "torchvision (full-tile images)": lambda: paste_masks_in_image(maps, boxes, (TILE, TILE), padding=1) > 0.5,
        "seamline before (box-local, one resize per mask)": lambda: paste_before(maps, boxes, TILE, TILE, 0.5),
        "seamline (box-local, one grid_sample per tile)": lambda: paste_masks_in_boxes(maps, boxes, TILE, TILE, 0.5),
    }
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = np.median(times["torchvision (full-tile images)"])
    return [[name, f"{1000 * np.median(t):.1f}", f"{base / np.median(t):.2f}"] for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    print("\nTraining targets pasted back onto their 300 ellipses:\n")
    print(table(["paste", "mean IoU", "min IoU", "centroid offset rows px", "centroid offset cols px"], accuracy(300)))
    print(f"\n{args.masks} masks in a {TILE}² tile, one torch thread, median of {args.repeats}:\n")
    print(table(["paste", "ms", "× torchvision's speed"], timing(args.masks, args.repeats)))


if __name__ == "__main__":
    main()
