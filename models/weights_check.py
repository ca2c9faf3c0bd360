"""A model's weights file checked before any work starts, without importing torch: the errors a
worker would meet for every image (truncated, pickled objects, other classes) said once, up front."""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from pathlib import Path

from models.card import ModelCard, ModelCardError

# modules a tensors-only checkpoint's pickle refers to (torch.load(weights_only=True) reads these)
TENSOR_MODULES = ("torch", "torch._utils", "collections", "_codecs", "builtins", "__builtin__")
CLASS_SCORES = "roi_heads.box_predictor.cls_score.weight"  # (classes + background, features)


def check_weights_file(model_dir: str | Path, card: ModelCard) -> Path:
    """The card's weights file: present; safetensors with a header that covers the file and, when
    it names the box predictor, as many classes as the card; a torch checkpoint whose archive is
    whole and whose pickle holds tensors only (a whole model saved with ``torch.save(model)`` is
    refused here, never unpickled). Whether every tensor fits the architecture is checked when a
    worker loads them."""
    path = Path(model_dir) / card.weights
    if not path.is_file() or path.stat().st_size == 0:
        raise ModelCardError(f"{path}: weights file {'is empty' if path.is_file() else 'not found'}")
    if path.suffix == ".safetensors":
        shapes = _safetensors_shapes(path)
        classes = next((shape[0] for name, shape in shapes.items() if name.endswith(CLASS_SCORES)), None)
        if classes is not None and classes != card.num_classes:
            raise ModelCardError(f"{path}: weights for {classes - 1} classes, the card lists {len(card.classes)} "
                                 f"({', '.join(card.classes)})")
    else:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
        if zipped:
            _check_torch_archive(path)
    return path


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON), checked to cover the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        try:
            if 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError) as err:
            raise ModelCardError(f"{path}: not a readable safetensors file ({err})") from None
    if 8 + length + end > size:
        raise ModelCardError(f"{path}: not a readable safetensors file (truncated: {size} of {8 + length + end} bytes)")
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _check_torch_archive(path: Path) -> None:
    """A torch checkpoint's zip archive whole (CRCs), and its pickle referring to tensor types only."""
    try:
        with zipfile.ZipFile(path) as archive:
            if (bad := archive.testzip()) is not None:
                raise zipfile.BadZipFile(f"{bad} is damaged")
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(pickles[0]) if pickles else b""
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelCardError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({err})") from None
    objects = sorted({f"{module}.{name}" for module, name in _pickled_globals(data) if module not in TENSOR_MODULES})
    if objects:
        raise ModelCardError(
            f"{path}: holds pickled objects ({', '.join(objects[:3])}{', …' if len(objects) > 3 else ''}), not only tensors: "
            "a whole model or trainer saved with torch.save; save model.state_dict() (or safetensors) instead. "
            "Seamline never unpickles code"
        )


def _pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every global a pickle refers to, read from its opcodes (nothing is run)."""
    found, strings, memo = set(), [], {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            elif op.name in ("GLOBAL", "INST"):
                found.add(tuple(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add((strings[-2], strings[-1]))
    except ValueError as err:  # opcodes cut short
        found.add(("(unreadable pickle)", str(err)))
    return found
