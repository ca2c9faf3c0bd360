"""Scheduled runs over an image archive: only what is new or changed, resumable, one lock per
output directory, a ledger entry per image, Prometheus metrics and a run report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server, write_to_textfile

from models.card import load_card
from models.weights_check import check_weights_file
from models.registry import resolve_model_dir
from pipeline.graph import Tiling
from pipeline.writers import atomic_path
from workflows.catalogue import build_catalogue
from workflows.cluster import connect, has_gpu_workers
from workflows.ledger import Ledger, config_hash, fingerprint, model_hash, run_lock
from workflows.report import write_report
from workflows.run import RunEvents, RunReport, assign_output_dirs, existing_output_dirs, run_images
from workflows.spec import Workflow, list_inputs


@dataclass
class BatchOutcome:
    """What one workflow run did: processed now, up to date already, failed (with reasons)."""

    report: RunReport
    up_to_date: list[str] = field(default_factory=list)
    failed_inputs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.failed_inputs


class Metrics:
    """The pipeline's own Prometheus metrics (Dask's are on the dashboard's ``/metrics``)."""

    def __init__(self, workflow: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["workflow"], registry=self.registry)
        self.tiles = Counter("seamline_tile_batches_done", "Tile batches segmented", **labels).labels(workflow)
        self.instances = Counter("seamline_instances_found", "Instances written", **labels).labels(workflow)
        self.done = Counter("seamline_images_done", "Images processed", **labels).labels(workflow)
        self.failed = Counter("seamline_images_failed", "Images that failed", **labels).labels(workflow)
        self.pending = Gauge("seamline_images_pending", "Images still to process", **labels).labels(workflow)
        self.finished = Gauge("seamline_last_run_finished_timestamp_seconds", "When the last run ended (alert when old)",
                              **labels).labels(workflow)
        self.success = Gauge("seamline_last_run_success", "1 when the last run processed every image, else 0",
                             **labels).labels(workflow)

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            write_to_textfile(str(tmp), self.registry)


def settings_of(workflow: Workflow, tiling: Tiling) -> dict:
    """What changes the results: a change in any of these reprocesses every image (not the batch
    size: results do not depend on it)."""
    return {"tiling": {k: v for k, v in tiling.__dict__.items() if k != "batch_size"}, "read": workflow.read.model_dump(mode="json"),
            "zarr": [workflow.outputs.zarr, workflow.outputs.density_cell]}


def finish_outputs(workflow: Workflow, out: Path, log) -> None:
    """The archive-wide catalogue and the HTML report; a failure here never fails the run."""
    if workflow.outputs.catalogue:
        try:
            log(f"catalogue: {build_catalogue(out)}")
        except Exception as err:
            log(f"catalogue not updated: {type(err).__name__}: {err}")
    if workflow.outputs.report:
        try:
            log(f"report: {write_report(out, f'Seamline — {workflow.name}')}")
        except Exception as err:
            log(f"report not written: {type(err).__name__}: {err}")


def run_workflow(workflow: Workflow, force: bool = False, show_progress: bool = True, log=print) -> BatchOutcome:
    """Process the workflow's new or changed images (all with ``force``) and record them."""
    out = workflow.outputs.dir
    model_dir = resolve_model_dir(workflow.model)
    card = load_card(model_dir)
    check_weights_file(model_dir, card)
    try:
        tiling = Tiling(
            workflow.tiling.tile_size or card.tile_size,
            card.overlap if workflow.tiling.overlap is None else workflow.tiling.overlap,
            workflow.tiling.batch_size,
            tissue_mask=workflow.tiling.tissue,
            test_time_flips=workflow.tiling.test_time_flips,
        )
    except ValueError as err:  # an overlap that does not fit the tile size (the card's, or the workflow's)
        raise ValueError(f"tiling: {err}") from None
    images, problems = list_inputs(workflow.inputs, out)  # before the lock: inputs that are a typo leave nothing behind
    metrics = Metrics(workflow.name)
    with run_lock(out), Ledger(out) as ledger:
        if workflow.monitoring.metrics_port:  # once the lock is held: a second run must fail on the lock, not the port
            try:
                start_http_server(workflow.monitoring.metrics_port, addr="127.0.0.1", registry=metrics.registry)
            except OSError as err:  # another process holds the port: the textfile still has the metrics
                log(f"warning: metrics not served on 127.0.0.1:{workflow.monitoring.metrics_port} ({err.strerror}); "
                    f"they are still written to {out / 'metrics.prom'}")
        config = config_hash(settings_of(workflow, tiling))
        model = model_hash(model_dir)
        for path, reason in problems.items():
            ledger.failed(Path(path), reason)
        for path, status in ledger.retire_missing({str(i) for i in images} | set(problems)):
            why = "gone since the last run" if status == "missing" else "no longer among the inputs"
            log(f"{why}: {path} (its results are kept in the folder, not served)")
        prints = {str(i): fingerprint(i, workflow.inputs.hash_content) for i in images}
        todo = [i for i in images if force or not ledger.is_current(i, prints[str(i)], config, model)]
        for image in set(images) - set(todo):
            ledger.reinstate(image)
        outcome = BatchOutcome(RunReport(), [str(i) for i in images if i not in todo], dict(problems))
        log(f"{len(images)} images: {len(todo)} to process, {len(outcome.up_to_date)} up to date, {len(problems)} unusable")
        taken = {Path(r["output_dir"]).name for r in ledger.rows() if r["output_dir"]}
        output_dirs = {str(i): ledger.folder(row) for i in todo if (row := ledger.get(i)) and ledger.folder(row)}
        output_dirs |= assign_output_dirs(out, [i for i in todo if str(i) not in output_dirs], taken | existing_output_dirs(out)[1])
        metrics.pending.set(len(todo))

        def done(image: str, summary: dict) -> None:
            ledger.done(Path(image), summary)
            metrics.done.inc()
            metrics.pending.dec()
            metrics.instances.inc(summary["instances"])

        def failed(image: str, error: str) -> None:
            ledger.failed(Path(image), error)
            metrics.failed.inc()
            metrics.pending.dec()

        events = RunEvents(
            started=lambda image, out_dir: ledger.started(Path(image), prints[image], config, model, out_dir),
            batch_done=lambda image: metrics.tiles.inc(), done=done, failed=failed,
            warned=lambda image, message: ledger.warned(Path(image), message),
        )
        if todo:
            cluster = workflow.cluster
            with connect(cluster.scheduler, cluster.workers, cluster.threads_per_worker, cluster.dashboard) as client:
                log(f"dashboard: {client.dashboard_link}")
                outcome.report = run_images(
                    client, todo, model_dir, card, out, tiling,
                    bands=tuple(workflow.read.bands) if workflow.read.bands else None,
                    value_range=workflow.read.value_range, gpu=has_gpu_workers(client), show_progress=show_progress,
                    mpp=workflow.read.mpp, output_dirs=output_dirs, resume=True, retries=cluster.retries, events=events,
                    labels=workflow.outputs.zarr, density_cell=workflow.outputs.density_cell, fingerprints=prints,
                    model_key=model,
                )
        metrics.failed.inc(len(problems))
        finish_outputs(workflow, out, log)
        metrics.finished.set_to_current_time()
        metrics.success.set(int(outcome.ok))
        if workflow.monitoring.metrics_file:
            metrics.write(out / "metrics.prom")
        with atomic_path(out / "run.json") as tmp:
            tmp.write_text(json.dumps({
                "workflow": workflow.name, "done": outcome.report.done, "up_to_date": outcome.up_to_date,
                "failed": {**outcome.failed_inputs, **outcome.report.failed},
            }, indent=2))
    return outcome
