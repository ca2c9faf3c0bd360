"""Find a model directory from a path or the name of a model shipped in ``models/zoo``."""

from __future__ import annotations

from pathlib import Path

from models.card import CARD_FILENAME, ModelCardError

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "synthetic-shapes"


def shipped_models() -> list[str]:
    """Names of the models shipped with Seamline."""
    return sorted(p.parent.name for p in ZOO.glob(f"*/{CARD_FILENAME}"))


def resolve_model_dir(model: str | Path | None = None) -> Path:
    """A model directory: ``model`` as a path if it is one, else a shipped model's name."""
    model = DEFAULT_MODEL if model is None else model
    path = Path(model)
    if (path / CARD_FILENAME).is_file():
        return path.resolve()
    if (ZOO / str(model) / CARD_FILENAME).is_file():
        return ZOO / str(model)
    raise ModelCardError(
        f"{model}: not a model directory (no {CARD_FILENAME}) and not a shipped model "
        f"(shipped: {', '.join(shipped_models()) or 'none'})"
    )
