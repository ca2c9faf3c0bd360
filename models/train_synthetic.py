"""Train the shipped demo model on synthetic scenes (``python -m models.train_synthetic``).

Scenes come from :mod:`models.synthetic`; each training crop is cut from a larger scene so that
objects cut by the tile edge are part of the training signal, as they are at inference time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from models.card import InputSpec, ModelCard
from models.inference import Segmenter
from models.synthetic import CLASSES, make_scene
from models.training import train, training_target

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


def train_demo(out: Path, minutes: float, batch_size: int, workers: int, lr: float, device: str) -> float:
    """Train the demo model into ``out``; returns its F1 on held-out scenes."""
    card = demo_card()
    train(card, SyntheticCrops(card.tile_size), out, minutes, batch_size, lr, device, workers)
    f1 = mask_f1(Segmenter(out, device=device), range(16), card.tile_size)
    print(f"f1@0.5={f1:.3f} on 16 held-out scenes")
    return f1


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
    train_demo(args.out, args.minutes, args.batch_size, args.workers, args.lr, args.device)


if __name__ == "__main__":
    main()
