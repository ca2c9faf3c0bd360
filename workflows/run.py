"""Run Seamline over a list of images on a Dask cluster, with progress and per-image isolation."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path

import psutil
from dask.base import tokenize
from distributed import Client, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.card import ModelCard
from pipeline.graph import ImageGraph, Tiling, discard_staging, image_graph
from pipeline.inputs import open_for_model
from pipeline.sources import SourceError, image_stem
from pipeline.stages import load_model
from pipeline.writers import remove, temporaries
from workflows.cluster import runs_on_gpu
from workflows.ledger import Fingerprint, fingerprint, model_hash


@dataclass
class RunReport:
    """What happened to each image: its summary when done, its error when not."""

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    model_error: str | None = None  # the model did not load on a worker: no image was segmented

    @property
    def ok(self) -> bool:
        return not self.failed


RESERVED = {"catalogue", "report", "run.json", "ledger.sqlite", "metrics.prom"}  # the run's own, never an image's


def _folder_stem(image: Path | str) -> str:
    return image_stem(image).lstrip(".") or "image"  # a hidden folder would hide the results


def assign_output_dirs(out_root: Path, images: list[Path], taken: set[str]) -> dict[str, Path]:
    """``out_root/<image stem>`` per image, whatever the order they come in: images sharing a stem,
    taken in the order of their resolved paths, get ``<stem>-2``, ``<stem>-3`` …, never a name in
    ``taken`` nor another input's own stem (``scene-2.tif`` keeps ``scene-2``)."""
    stems = {_folder_stem(i) for i in images}
    taken, dirs = set(taken), {}
    for image in sorted(images, key=lambda i: str(Path(i).resolve())):
        name = stem = _folder_stem(image)
        n = 1
        while name in taken or name in RESERVED or (n > 1 and name in stems):
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        dirs[str(image)] = out_root / name
    return dirs


def existing_output_dirs(out_root: Path) -> tuple[dict[Path, Path], set[str]]:
    """Output folders under ``out_root``: by the image file (resolved) their ``counts.json`` names,
    for files that still exist (a rerun writes an image where it wrote it before, and another file
    of the same stem never takes its folder; a folder whose file is gone may be taken), and the
    names of those holding results with no readable ``counts.json``: whose they are is unknown, so
    no image is written over them."""
    owners, unowned = {}, set()
    for folder in sorted(Path(out_root).glob("*/")):
        try:
            image = Path(json.loads((folder / "counts.json").read_text())["image"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            if any((folder / name).exists() for name in ("instances.gpkg", "labels.zarr")):
                unowned.add(folder.name)
            continue
        if image.is_file():
            owners.setdefault(image, folder)
    return owners, unowned


@dataclass
class RunEvents:
    """What a run announces as it goes (the ledger and the metrics listen)."""

    started: Callable[[str, Path], None] = lambda image, out_dir: None
    warned: Callable[[str, str], None] = lambda image, message: None
    batch_done: Callable[[str], None] = lambda image: None
    done: Callable[[str, dict], None] = lambda image, summary: None
    failed: Callable[[str, str], None] = lambda image, error: None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_images``: the output folders of the images it left unfinished, and the
    processes of the local cluster it ran on (none for a remote scheduler's)."""

    def __init__(self, unfinished: list[Path], client: Client) -> None:
        super().__init__()
        self.unfinished = unfinished
        self.processes = _grandchildren() if client.cluster is not None else None

    def discard_staging(self, timeout: float = 30) -> None:
        """Once the local cluster is closed: wait for its processes (a worker's side process ends
        soon after its worker) and remove what the unfinished images staged (``discard_staging``:
        a resumable run's kept batches stay). A remote cluster's workers may still be writing: left."""
        if self.processes is None:
            return
        psutil.wait_procs(self.processes, timeout=timeout)
        for folder in self.unfinished:
            discard_staging(folder)


def _grandchildren() -> list[psutil.Process]:
    """This process's descendants below its children: the side processes of a local cluster's
    workers, which outlive their worker by a moment (the workers themselves end as the cluster
    closes; other children, such as multiprocessing's resource tracker, live on with this process)."""
    me = os.getpid()
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.ppid() != me:
                found.append(process)
    return found


def run_images(
    client: Client,
    images: list[Path],
    model_dir: Path,
    card: ModelCard,
    out_root: Path,
    tiling: Tiling,
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    gpu: bool = False,
    show_progress: bool = True,
    mpp: float | None = None,
    output_dirs: dict[str, Path] | None = None,
    resume: bool = False,
    retries: int = 0,
    events: RunEvents | None = None,
    labels: bool = True,
    density_cell: int = 256,
    fingerprints: dict[str, Fingerprint] | None = None,
    model_key: str | None = None,
) -> RunReport:
    """Segment every image on ``client``; one image failing never stops the others. With
    ``resume``, segmented batches are kept until an image is written, and an interrupted image
    restarts from them (``fingerprints``: the images' states as the caller took them, by path,
    default: size and mtime; ``model_key``: the model's ``ledger.model_hash``, taken here if not
    given). ``output_dirs`` fixes where each image goes (default: where its outputs already are,
    else ``assign_output_dirs``)."""
    events = events or RunEvents()
    tiling = tiling.for_workers(runs_on_gpu(client))  # a batch size not given: the workers' device's
    out_root = Path(out_root).absolute()  # summaries name their files by paths that hold from anywhere
    report = RunReport()
    graphs: dict[str, ImageGraph] = {}
    out_dirs: dict[str, Path] = {}
    priority = 0  # each image's bands below the previous image's: one image after another
    first_of = {}
    for image in images:  # a file given twice (under any spelling) runs once
        first = first_of.setdefault(Path(image).resolve(), image)
        if first is not image:
            report.warnings.setdefault(str(first), []).append(f"{image}: the same file as {first}: segmented once")
    if output_dirs is None:
        owners, unowned = existing_output_dirs(out_root)
        output_dirs = {str(image): owners[path] for path, image in first_of.items() if path in owners}
        new = [image for image in first_of.values() if str(image) not in output_dirs]
        output_dirs |= assign_output_dirs(out_root, new, {folder.name for folder in owners.values()} | unowned)
        for image in new:
            if (stem := _folder_stem(image)) in unowned:
                report.warnings.setdefault(str(image), []).append(
                    f"{out_root / stem}: results without a readable counts.json (their image is unknown) kept; "
                    f"{image} written to {output_dirs[str(image)]}")
    for image in first_of.values():
        out_dir = output_dirs[str(image)]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                source = open_for_model(image, card, bands, value_range, mpp)
                if source.image_id != out_dir.name:  # two inputs with one stem: ids follow their folders
                    source = replace(source, name=out_dir.name)
                resume_dir = None
                if resume:
                    model_key = model_key or model_hash(Path(model_dir))
                    state = (fingerprints or {}).get(str(image)) or fingerprint(Path(image))
                    resume_dir = resume_folder(out_dir, source, model_key, tiling, state)
                graphs[str(image)] = image_graph(
                    source, str(model_dir), card.classes, out_dir, tiling, gpu=gpu, resume_dir=resume_dir,
                    labels=labels, density_cell=density_cell, priority=priority,
                )
            priority -= graphs[str(image)].bands
            out_dirs[str(image)] = out_dir
            events.started(str(image), out_dir)
            for warning in caught:
                report.warnings.setdefault(str(image), []).append(str(warning.message))
                events.warned(str(image), str(warning.message))
        except (SourceError, ValueError) as err:
            report.failed[str(image)] = str(err)
            events.failed(str(image), str(err))
        except Exception as err:  # whatever one file does, the others go on
            report.failed[str(image)] = " ".join(f"{image}: {type(err).__name__}: {err}".split())
            events.failed(str(image), report.failed[str(image)])
    if graphs and (error := model_load_error(client, model_dir, tiling.test_time_flips, gpu)):
        report.model_error = error
        for name in graphs:
            report.failed[name] = f"{name}: not segmented: {error}"
            events.failed(name, report.failed[name])
            discard_staging(out_dirs[name])
        return report
    batch_futures = client.compute([b for g in graphs.values() for b in g.batches], optimize_graph=False, retries=retries)
    owners = [name for name, g in graphs.items() for _ in g.batches]
    image_of_batch = {f.key: name for f, name in zip(batch_futures, owners)}
    result_futures = client.compute([g.result for g in graphs.values()], optimize_graph=False, retries=retries)
    image_of = {f.key: name for f, name in zip(result_futures, graphs)}
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not show_progress,
    )
    try:
        with progress:
            tiles_task = progress.add_task("tile batches", total=len(batch_futures))
            images_task = progress.add_task("images", total=len(result_futures))
            completed = as_completed(batch_futures + result_futures)
            for future in completed:
                if future.key in image_of:
                    name = image_of[future.key]
                    if future.status == "finished":
                        report.done[name] = future.result()
                        events.done(name, report.done[name])
                    else:
                        error = future.exception()
                        named = isinstance(error, SourceError) or str(error).startswith(name)  # SourceErrors name their file
                        cause = str(error) if named else f"{name}: {type(error).__name__}: {error}"
                        report.failed[name] = " ".join(cause.split())
                        events.failed(name, report.failed[name])
                        unfinished = [f for f, owner in zip(batch_futures, owners) if owner == name and not f.done()]
                        _drop(completed, unfinished)
                        progress.advance(tiles_task, len(unfinished))
                    progress.advance(images_task)
                else:
                    if future.status == "finished":
                        events.batch_done(image_of_batch[future.key])
                    progress.advance(tiles_task)
                future.release()
    except KeyboardInterrupt:  # the images not yet done or failed: their staging goes once the cluster is closed
        unfinished = [out_dirs[name] for name in graphs if name not in report.done and name not in report.failed]
        raise RunInterrupted(unfinished, client) from None
    for name in report.failed.keys() & out_dirs.keys():  # now that none of their tasks still runs
        discard_staging(out_dirs[name])
    for name in report.done:  # what an older run kept or wrote and this one does not replace
        folder = out_dirs[name]
        stale = [*folder.glob(".partial-*"), *temporaries(folder), *([] if labels else [folder / "labels.zarr"])]
        for path in stale:
            remove(path)
    return report


def model_load_error(client: Client, model_dir: Path, flips: bool | None, gpu: bool) -> str | None:
    """Load the model on a worker before any tile (it keeps it for them); what went wrong, once,
    if it cannot (weights that do not fit the architecture, a device it cannot use), else None."""
    key = f"load-model-{tokenize(str(model_dir), flips, gpu)}"
    future = client.submit(load_model, str(model_dir), flips, key=key, pure=False, resources={"GPU": 1} if gpu else None)
    try:
        future.result()
    except Exception as err:
        return " ".join(f"model {model_dir}: {type(err).__name__}: {err}".split())
    finally:
        future.release()
    return None


def _drop(completed: as_completed, futures: list) -> None:
    """Stop waiting for ``futures`` and release them: the scheduler drops those not yet running.
    (Not ``client.cancel``: cancelling a task whose dependents the client does not hold, as a
    batch's merge, fails an assertion in the scheduler and loses the client's other futures.)"""
    with completed.lock:
        for future in futures:
            completed.futures.pop(future, None)
    for future in futures:
        future.release()


def resume_folder(out_dir: Path, source, model_key: str, tiling: Tiling, image_state: Fingerprint) -> Path:
    """Where an image's segmented batches are kept for a resume. Named by the settings, the model's
    content (``ledger.model_hash``) and the image file's state (its ``ledger.fingerprint``: size
    and mtime, and the SHA-256 of its content when the workflow hashes content): batches of a file
    or model replaced in place since, even with the same size and time, are never reused."""
    return out_dir / f".partial-{tokenize(source, model_key, tiling, astuple(image_state))}"
