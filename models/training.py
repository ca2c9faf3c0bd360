"""Train or fine-tune a Mask R-CNN on in-memory annotated images (NumPy in, model directory out).

Readers of annotation formats live in ``pipeline.annotations``; a *training pack* (``.npz``, no
pickles) carries decoded samples so that training can run where only torch is installed (a GPU
machine). Checkpoints are plain tensors and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.builders import build_model
from models.card import ModelCard, save_card
from models.weights import save_weights


@dataclass
class Sample:
    """One annotated image: uint8 (h, w, 3), int32 instance labels, class index per instance."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    classes: np.ndarray


def save_pack(path: str | Path, samples: list[Sample], class_names: list[str], resolution: float | None) -> Path:
    """Write samples as one compressed ``.npz`` (arrays only, loadable without pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        arrays[f"image_{i}"], arrays[f"labels_{i}"], arrays[f"classes_{i}"] = s.image, s.labels, s.classes
    meta = {"names": [s.name for s in samples], "class_names": class_names, "resolution": resolution}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def load_pack(path: str | Path) -> tuple[list[Sample], list[str], float | None]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes())
        samples = [
            Sample(name, data[f"image_{i}"], data[f"labels_{i}"], data[f"classes_{i}"])
            for i, name in enumerate(meta["names"])
        ]
    return samples, meta["class_names"], meta["resolution"]


def training_target(labels: np.ndarray, classes: np.ndarray, min_area: int = 12) -> dict[str, torch.Tensor]:
    """Boxes, labels (1-based) and masks of the instances present in a label crop."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[areas >= min_area]
    masks = labels[None] == ids[:, None, None]
    rows, cols = masks.any(2), masks.any(1)
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)], 1
    ) if len(ids) else np.zeros((0, 4))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(classes[ids - 1].astype(np.int64) + 1),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, colour: float, stain: bool):
    """Flips, rot90, brightness/contrast (and, for H&E, per-channel optical-density) jitter."""
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    k = int(rng.integers(4))
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    pixels = image.astype(np.float32) / 255
    if stain:
        density = -np.log(np.clip(pixels, 1 / 255, 1))
        density *= rng.uniform(1 - colour, 1 + colour, size=3)
        pixels = np.exp(-density)
    pixels = pixels * rng.uniform(1 - colour, 1 + colour) + rng.uniform(-colour / 2, colour / 2)
    return np.clip(pixels, 0, 1), np.ascontiguousarray(labels)


class RandomCrops(IterableDataset):
    """Endless random crops (rescaled by ``scale`` range) from samples, weighted by image area."""

    def __init__(self, samples: list[Sample], crop: int, scale=(0.8, 1.25), colour=0.15, stain=False, seed=0):
        self.samples, self.crop, self.scale, self.colour, self.stain, self.seed = samples, crop, scale, colour, stain, seed

    def __iter__(self):
        info = get_worker_info()
        rng = np.random.default_rng((self.seed, info.id if info else 0))
        weights = np.array([s.labels.size for s in self.samples], float)
        while True:
            sample = self.samples[rng.choice(len(self.samples), p=weights / weights.sum())]
            factor = float(np.exp(rng.uniform(*np.log(self.scale))))
            size = max(8, int(round(self.crop / factor)))
            h, w = sample.labels.shape
            r, c = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
            image = np.zeros((size, size, 3), np.uint8)
            labels = np.zeros((size, size), np.int32)
            part = sample.labels[r : r + size, c : c + size]
            image[: part.shape[0], : part.shape[1]] = sample.image[r : r + size, c : c + size]
            labels[: part.shape[0], : part.shape[1]] = part
            pixels, labels = augment(image, labels, rng, self.colour, self.stain)
            tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
            if size != self.crop:
                tensor = F.interpolate(tensor[None], size=(self.crop, self.crop), mode="bilinear", align_corners=False)[0]
                labels = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=(self.crop, self.crop), mode="nearest")[0, 0].numpy().astype(np.int32)
            yield tensor, training_target(labels, sample.classes)


def collate(batch):
    return tuple(zip(*batch))


def train(
    card: ModelCard,
    crops: IterableDataset,
    out_dir: Path,
    minutes: float,
    batch_size: int = 8,
    lr: float = 0.02,
    device: str = "cpu",
    workers: int = 2,
    resume: bool = False,
    max_steps: int | None = None,
    log_every: int = 20,
    progress: bool = True,
    init: Path | None = None,
    checkpoint_minutes: float = 5.0,
) -> list[dict]:
    """Train for ``minutes`` (cosine schedule over that budget) or ``max_steps``; write the model directory.

    Writes ``model.yaml``, weights (safetensors), ``checkpoint.pt`` (tensors only, for ``resume``),
    ``training_log.csv`` and ``loss.png`` when matplotlib is installed. Returns the loss log.
    ``checkpoint.pt`` and the log are also written every ``checkpoint_minutes`` while training, so a
    run that dies loses at most that much (``resume`` continues it, schedule included).
    ``init`` fine-tunes from another model directory: every tensor whose name and shape fit is
    copied (class-specific heads are re-initialised when the classes differ).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    save_card(card, out_dir)  # first, so that a resume of a killed run can check it trains the same classes
    model = build_model(card)
    if init is not None:
        _initialise_from(model, init)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    checkpoint, step, spent = out_dir / "checkpoint.pt", 0, 0.0
    log: list[dict] = []
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # another architecture, class list or anchors
            mismatch = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(
                f"{checkpoint}: written for another model than this one ({mismatch}); resume with the same "
                "classes and options, or train into a new --out"
            ) from None
        optimiser.load_state_dict(state["optimiser"])
        step, spent = int(state["step"]), float(state["seconds"])
        log = _read_log(out_dir / "training_log.csv")
        if spent >= minutes * 60 and not max_steps:
            raise ValueError(
                f"{checkpoint}: its run already trained {spent / 60:.1f} of the {minutes:g} minutes asked for; "
                "give a larger --minutes to continue"
            )
    loader = DataLoader(crops, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    budget, start, warmup = minutes * 60, time.time() - spent, 200
    saved = time.time()
    amp = torch.device(device).type == "cuda"
    from rich.progress import Progress

    row = None
    with Progress(disable=not progress) as bar:
        task = bar.add_task("training", total=max_steps or budget)
        for images, targets in loader:
            elapsed = time.time() - start
            if elapsed >= budget or (max_steps and step >= max_steps):
                break
            step += 1
            fraction = step / max_steps if max_steps else elapsed / budget
            for group in optimiser.param_groups:
                group["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
            images = [i.to(device, non_blocking=True) for i in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimiser.step()
            row = {"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4)}
            row.update({k: round(v.item(), 4) for k, v in losses.items()})
            bar.update(task, completed=step if max_steps else elapsed, description=f"training, loss {row['loss']:.3f}")
            if step % log_every == 0:
                log.append(row)
            if time.time() - saved >= checkpoint_minutes * 60:
                _save_checkpoint(checkpoint, model, optimiser, step, time.time() - start)
                _write_log(out_dir, log)
                saved = time.time()
                if progress:  # a line per checkpoint: what a batch job's log shows, where no bar is drawn
                    _print_checkpoint_line(bar.console, row, log, "checkpoint written")
        if row is not None and (not log or log[-1]["step"] != step):
            log.append(row)  # the last step is always logged
    model.eval().cpu()
    _save_checkpoint(checkpoint, model, optimiser, step, time.time() - start)
    save_weights(model, out_dir / card.weights)
    save_card(card, out_dir)
    _write_log(out_dir, log)
    if progress and row is not None:
        _print_checkpoint_line(bar.console, row, log, "done: weights and checkpoint written")
    return log


def _print_checkpoint_line(console, row: dict, log: list[dict], what: str) -> None:
    recent = [r["loss"] for r in log[-5:]] or [row["loss"]]
    console.print(f"step {row['step']}, {row['seconds'] / 60:.1f} min: loss {np.mean(recent):.3f} "
                  f"(mean of the last {len(recent)} logged); {what}", soft_wrap=True)


def _save_checkpoint(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int, seconds: float) -> None:
    """Tensors only (``torch.load(weights_only=True)`` reads it back), written under a temporary name, then renamed."""
    state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": torch.tensor(step),
             "seconds": torch.tensor(seconds)}
    with _renamed_when_written(path) as partial:
        torch.save(state, partial)


@contextmanager
def _renamed_when_written(path: Path):
    """Yield a temporary name beside ``path``; what was written there replaces ``path`` on success."""
    partial = path.with_name(f".{path.name}.partial")
    yield partial
    os.replace(partial, path)


def _initialise_from(model: torch.nn.Module, model_dir: Path) -> None:
    from models.card import load_card
    from models.weights import read_state_dict

    source = read_state_dict(Path(model_dir) / load_card(model_dir).weights)
    own = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"{model_dir}: no weights fit this architecture")
    model.load_state_dict(fitting, strict=False)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: int(v) if k == "step" else float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _write_log(out_dir: Path, log: list[dict]) -> None:
    """``training_log.csv`` and ``loss.png``, each written under a temporary name, then renamed."""
    if not log:
        return
    with _renamed_when_written(out_dir / "training_log.csv") as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in log]
    for key in [k for k in log[0] if k.startswith("loss")]:
        axis.plot(steps, [row[key] for row in log], label=key, linewidth=1)
    axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    with _renamed_when_written(out_dir / "loss.png") as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)


def main() -> None:
    """``python -m models.training PACK --card CARD.yaml --out DIR``: train from a training pack."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--card", type=Path, required=True, help="model.yaml to train (classes must match the pack)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stain", action="store_true", help="H&E optical-density jitter")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    card = ModelCard.model_validate(yaml.safe_load(args.card.read_text()))
    samples, class_names, _ = load_pack(args.pack)
    if class_names != card.classes:
        raise SystemExit(f"{args.pack}: classes {class_names} differ from the card's {card.classes}")
    crops = RandomCrops(samples, card.tile_size, stain=args.stain)
    log = train(card, crops, args.out, args.minutes, args.batch_size, args.lr, args.device, args.workers, args.resume)
    print(f"steps={int(log[-1]['step']) if log else 0} last_loss={log[-1]['loss'] if log else float('nan')}")


if __name__ == "__main__":
    main()
