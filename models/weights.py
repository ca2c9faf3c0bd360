"""Safe weight files: safetensors, or ``torch.load(weights_only=True)`` — never arbitrary unpickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ModelWeightsError(ValueError):
    """Weights are missing, unsafe, or do not fit the card's architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a plain tensor checkpoint (``.pt``/``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelWeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError and OSError types
            raise ModelWeightsError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelWeightsError(
            f"{path}: refused, the checkpoint needs arbitrary code to unpickle; save a plain state_dict "
            "or safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelWeightsError(f"{path}: not a readable torch checkpoint ({err})") from err
    for wrapper in ("model", "state_dict", "model_state_dict"):  # torchvision's reference scripts; Lightning, mmdet; tutorials
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"keys {', '.join(map(str, list(state)[:5]))}" if isinstance(state, dict) else type(state).__name__
        raise ModelWeightsError(f"{path}: expected a state_dict of tensors (or one under 'model', 'state_dict' or "
                                f"'model_state_dict'), found {found}")
    return state


def load_weights(model: nn.Module, path: str | Path, description: str) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the file and the offending keys."""
    state = read_state_dict(path)
    expected = model.state_dict()
    for prefix in ("module.", "model."):  # DataParallel's, Lightning's
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    # BatchNorm's step counter, absent from FrozenBatchNorm checkpoints (torchvision's own): unused here
    state.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append(f"shape mismatch: {', '.join(wrong_shape[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ModelWeightsError(f"{path}: weights do not fit {description}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state_dict as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes 0600: a model is for others (workers, containers) to read
    os.replace(tmp, path)
    return path
