"""Workflow files: what a scheduled run processes, with which model, tiling, outputs and cluster.

A workflow is YAML validated by pydantic; unknown keys and wrong types are rejected, and every
error names the key and its line. Relative paths are relative to the workflow file.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import itertools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.sources import checked_value_range

IMAGE_PATTERNS = ["*.tif", "*.tiff", "*.svs", "*.ndpi", "*.mrxs", "*.scn", "*.vms", "*.bif", "*.jp2", "*.png", "*.jpg"]


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names the file, the key and the line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Inputs(Strict):
    paths: list[Path] = Field(default_factory=list, description="files or directories (searched recursively)")
    patterns: list[str] = Field(default_factory=lambda: list(IMAGE_PATTERNS), description="file patterns in directories")
    globs: list[str] = Field(default_factory=list, description="glob patterns, ** allowed")
    manifest: Path | None = Field(None, description="CSV with a 'path' column")
    roots: list[Path] = Field(default_factory=list, description="when set, every input must lie under one of these")
    hash_content: bool = Field(False, description="fingerprint files by SHA-256 too (not only size and mtime)")

    @model_validator(mode="after")
    def _something(self) -> "Inputs":
        if not (self.paths or self.globs or self.manifest):
            raise ValueError("give at least one of paths, globs or manifest")
        return self


class TilingSpec(Strict):
    tile_size: int | None = Field(None, ge=64, le=4096, multiple_of=32)
    overlap: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1, le=256, description="tiles per model call; None: 16 when the cluster has GPU workers, else 4")
    test_time_flips: bool | None = Field(None, description="flip test-time augmentation; None: as the model card says")
    tissue: bool = Field(True, description="slides: only tiles over tissue found on a thumbnail; false: every tile with pixels")


class ReadSpec(Strict):
    bands: list[int] | None = None
    value_range: tuple[float, float] | None = None
    mpp: float | None = Field(None, gt=0, allow_inf_nan=False, description="slides: level-0 µm per pixel when files lack it")

    @field_validator("bands")
    @classmethod
    def _positive(cls, bands):
        if bands is not None and (not bands or any(b < 1 for b in bands)):
            raise ValueError("bands are 1-based and at least one is needed")
        return bands

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, value_range):
        return None if value_range is None else checked_value_range(value_range)


class Outputs(Strict):
    dir: Path
    zarr: bool = Field(True, description="labels.zarr per image: instance/class rasters, pyramid, density grids")
    density_cell: int = Field(256, ge=8, le=65536, description="density grid cell, in processed pixels")
    catalogue: bool = True
    report: bool = True

    @field_validator("dir")
    @classmethod
    def _directory(cls, path):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        return path


class ClusterSpec(Strict):
    scheduler: str | None = Field(None, description="address of an existing scheduler; default: a local cluster")
    workers: int = Field(1, ge=1, le=256)
    threads_per_worker: int | None = Field(None, ge=1, le=256, description="default: cores ÷ workers")
    dashboard: str = "127.0.0.1:8787"
    retries: int = Field(2, ge=0, le=10, description="retries of a failed task (transient errors)")


class Monitoring(Strict):
    metrics_port: int | None = Field(None, ge=1024, le=65535, description="serve Prometheus metrics on 127.0.0.1:PORT")
    metrics_file: bool = Field(True, description="write OUT/metrics.prom (node-exporter textfile format)")


class Workflow(Strict):
    name: str = "seamline"
    inputs: Inputs
    model: str | None = None
    tiling: TilingSpec = TilingSpec()
    read: ReadSpec = ReadSpec()
    outputs: Outputs
    cluster: ClusterSpec = ClusterSpec()
    monitoring: Monitoring = Monitoring()


def _repeated_keys(node: yaml.Node | None, path: str = "") -> list[tuple[str, int]]:
    """(key, line) of every key given a second time in its mapping (YAML keeps the last silently)."""
    found = []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = f"{path}{key.value}"
            if key.value in seen:
                found.append((name, key.start_mark.line + 1))
            seen.add(key.value)
            found += _repeated_keys(value, f"{name}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found += _repeated_keys(item, path)
    return found


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """Line (1-based) of the YAML node at ``location`` (the deepest one that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None) or next(
                (k for k, _ in node.value if k.value == key), None
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _resolve(base: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Paths in the file are relative to the workflow's folder."""
    def absolute(value):  # one spelling per file: the ledger knows images by path
        return os.path.normpath(value if Path(value).is_absolute() else base / value)

    inputs = raw.get("inputs")
    if isinstance(inputs, dict):
        for key in ("paths", "roots"):
            if isinstance(inputs.get(key), list):
                inputs[key] = [absolute(v) for v in inputs[key]]
        if isinstance(inputs.get("globs"), list):
            inputs["globs"] = [absolute(v) for v in inputs["globs"]]
        if isinstance(inputs.get("manifest"), str):
            inputs["manifest"] = absolute(inputs["manifest"])
    outputs = raw.get("outputs")
    if isinstance(outputs, dict) and isinstance(outputs.get("dir"), str):
        outputs["dir"] = absolute(outputs["dir"])
    model = raw.get("model")
    if isinstance(model, str) and ("/" in model or model.startswith(".") or (base / model / "model.yaml").is_file()):
        raw["model"] = absolute(model)  # a path, relative to the workflow file; a bare name is a shipped model
    return raw


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file; errors name the file, the key and its line."""
    path = Path(path)
    try:
        text = path.read_text()
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except OSError as err:
        raise WorkflowError(f"{path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise WorkflowError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise WorkflowError(f"{path}: a workflow is a mapping of keys (inputs, model, outputs, …)")
    if repeated := _repeated_keys(node):
        raise WorkflowError("; ".join(f"{path}:{line}: {key}: given twice (the first would be ignored)" for key, line in repeated))
    try:
        return Workflow.model_validate(_resolve(path.resolve().parent, raw))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(k) for k in e["loc"]) or "workflow"
            problems.append(f"{path}:{_line_of(node, e['loc'])}: {key}: {e['msg']}")
        raise WorkflowError("; ".join(problems)) from err


def _under(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _in_folder(folder: Path, patterns: list[str], skip: Path | None) -> list[Path]:
    """Files under ``folder`` matching any pattern, in any letter case; hidden files and folders
    (``.snapshot/``, macOS ``._*``) and the folder ``skip`` (the run's own outputs) left out."""
    wanted = [p.lower() for p in patterns]
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(".") and (skip is None or Path(root, f).resolve() != skip)]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and any(fnmatch.fnmatchcase(f.lower(), w) for w in wanted)]
    return found


def _manifest_paths(manifest: Path) -> tuple[list[Path], dict[str, str]]:
    """Paths of a CSV manifest's 'path' column (relative to the manifest), and its rows without one."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's CSVs start with a BOM
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise WorkflowError(f"{manifest}: cannot read the manifest ({err.strerror})") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise WorkflowError(f"{manifest}: not a CSV text file with a 'path' column ({err})") from err
    if rows and "path" not in rows[0]:
        raise WorkflowError(f"{manifest}: the manifest needs a 'path' column (it has: {', '.join(map(str, rows[0]))})")
    paths, problems = [], {}
    for line, row in enumerate(rows, start=2):
        value = (row.get("path") or "").strip()
        if not value:
            problems[f"{manifest}:{line}"] = f"{manifest}:{line}: no path in this row"
            continue
        paths.append(Path(os.path.normpath(value if Path(value).is_absolute() else manifest.parent / value)))
    return paths, problems


def list_inputs(inputs: Inputs, outputs: Path | None = None) -> tuple[list[Path], dict[str, str]]:
    """(images to process in a stable order, {path: why it cannot be used}) — a missing file is
    reported, not dropped silently, and never stops the others. Nothing under the ``outputs``
    folder is an input, whether a folder, a glob or the manifest finds it (a run's pictures are no input). Inputs that match nothing at all are refused:
    a nightly job with a typo must not pass green."""
    skip = outputs.resolve() if outputs is not None else None
    found: list[Path] = []
    problems: dict[str, str] = {}
    for entry in inputs.paths:
        if entry.is_dir():
            found += _in_folder(entry, inputs.patterns, skip)
        else:
            found.append(entry)
    for pattern in inputs.globs:
        matched = [Path(os.path.normpath(p)) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        fixed = Path(*[part for part in itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts)])
        if not matched and not fixed.is_dir():  # a typo in one of several globs must not pass green either
            problems[pattern] = f"{pattern}: matches nothing: " + (f"no folder {fixed}" if glob.has_magic(pattern) else "file not found")
        found += matched
    if inputs.manifest is not None:
        listed, unusable = _manifest_paths(inputs.manifest)
        problems.update(unusable)
        found += listed
    images: list[Path] = []
    seen: set[Path] = set()
    for image in found:
        key = image.resolve()
        if key in seen or (skip is not None and key.is_relative_to(skip)):  # a run's own outputs, however matched
            continue
        seen.add(key)
        if inputs.roots and not _under(image, inputs.roots):
            problems[str(image)] = f"{image}: outside the workflow's input roots"
        elif not image.is_file():
            problems[str(image)] = f"{image}: file not found"
        else:
            images.append(image)
    if not images and all(p.endswith(": file not found") or ": matches nothing: " in p for p in problems.values()):  # a typo, not bad images
        where = [*map(str, inputs.paths), *inputs.globs, *([str(inputs.manifest)] if inputs.manifest else [])]
        missing = f"; not found: {', '.join(problems)}" if problems else ""
        raise WorkflowError(f"no image found in {', '.join(where)} (patterns {', '.join(inputs.patterns)}){missing}")
    return sorted(images, key=str), problems
