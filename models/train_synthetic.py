"""Train the shipped demo model on synthetic scenes (``python -m models.train_synthetic``).

Scenes come from :mod:`models.synthetic`; each training crop is cut from a larger scene so that
objects cut by the tile edge are part of the training signal, as they are at inference time.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.builders import build_model
from models.card import InputSpec, ModelCard, save_card
from models.inference import Segmenter
from models.synthetic import CLASSES, make_scene
from models.weights import save_weights

MARGIN = 96
EVAL_SEED_OFFSET = 10_000_000


def demo_card(tile_size: int = 512) -> ModelCard:
    """The card of the shipped ``synthetic-shapes`` model."""
    return ModelCard(
        name="synthetic-shapes",
        architecture="maskrcnn_compact",
        classes=list(CLASSES),
        input=InputSpec(channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        tile_size=tile_size,
        overlap=64,
        score_threshold=0.5,
        mask_threshold=0.5,
        max_detections=300,
        anchor_sizes=[16, 32, 64, 128, 256],
        description="Ellipses, rectangles and triangles (10-150 px) on textured backgrounds; "
        "trained by models/train_synthetic.py on generated scenes only.",
    )


def training_target(labels: np.ndarray, classes: np.ndarray, min_area: int = 12) -> dict[str, torch.Tensor]:
    """Boxes, labels and masks of the instances present in a crop of a label image."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[areas >= min_area]
    masks = labels[None] == ids[:, None, None]
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return {
        "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.tensor(classes[ids - 1].astype(np.int64) + 1),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


class SyntheticCrops(IterableDataset):
    """An endless stream of (image, target) crops from fresh synthetic scenes."""

    def __init__(self, crop: int, seed: int = 0) -> None:
        self.crop, self.seed = crop, seed

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng((self.seed, worker))
        index = worker
        while True:
            size = self.crop + 2 * MARGIN
            scene = make_scene(self.seed * 1_000_003 + index, size, size, density=rng.uniform(0.6, 2.5))
            index += workers
            r, c = rng.integers(0, 2 * MARGIN, size=2)
            image = scene.image[r : r + self.crop, c : c + self.crop].astype(np.float32) / 255
            image = np.clip(image * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08), 0, 1)
            labels = scene.labels[r : r + self.crop, c : c + self.crop]
            if rng.random() < 0.5:
                image, labels = image[:, ::-1], labels[:, ::-1]
            k = int(rng.integers(4))
            image, labels = np.rot90(image, k), np.rot90(labels, k)
            target = training_target(np.ascontiguousarray(labels), scene.classes)
            yield torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


def mask_f1(segmenter: Segmenter, seeds: range, size: int, iou: float = 0.5) -> float:
    """F1 at mask IoU ``iou`` over whole synthetic scenes of ``size``², one tile each."""
    tp = fp = fn = 0
    for seed in seeds:
        scene = make_scene(EVAL_SEED_OFFSET + seed, size, size)
        found = segmenter(scene.image[None])[0]
        matched: set[int] = set()
        for crop in found.masks:
            h, w = crop.mask.shape
            gt = scene.labels[crop.row : crop.row + h, crop.col : crop.col + w]
            ids, inter = np.unique(gt[crop.mask], return_counts=True)
            best = 0
            for gid, n in zip(ids, inter):
                if gid and gid not in matched:
                    union = crop.mask.sum() + (scene.labels == gid).sum() - n
                    if n / union >= iou:
                        best = gid
            if best:
                matched.add(best)
                tp += 1
            else:
                fp += 1
        fn += scene.count - len(matched)
    return 2 * tp / max(2 * tp + fp + fn, 1)


def train(out: Path, minutes: float, batch_size: int, workers: int, lr: float, device: str) -> None:
    card = demo_card()
    model = build_model(card).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(
        SyntheticCrops(card.tile_size), batch_size=batch_size, num_workers=workers, collate_fn=lambda b: tuple(zip(*b))
    )
    out.mkdir(parents=True, exist_ok=True)
    budget, start, warmup = minutes * 60, time.time(), 300
    log = []
    for step, (images, targets) in enumerate(loader, 1):
        progress = (time.time() - start) / budget
        if progress >= 1:
            break
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        images = [i.to(device, non_blocking=True) for i in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimiser.step()
        if step % 20 == 0:
            row = {"step": step, "seconds": round(time.time() - start, 1), "loss": round(float(loss), 4)}
            row.update({k: round(float(v), 4) for k, v in losses.items()})
            log.append(row)
            print(row, flush=True)
    model.eval()
    save_weights(model.cpu(), out / card.weights)
    save_card(card, out)
    with open(out / "training_log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    segmenter = Segmenter(out, device=device)
    print(f"steps={step} minutes={(time.time() - start) / 60:.1f} f1@0.5={mask_f1(segmenter, range(16), 512):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "zoo" / "synthetic-shapes")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    train(args.out, args.minutes, args.batch_size, args.workers, args.lr, args.device)


if __name__ == "__main__":
    main()
