"""The ``seamline`` command line."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from models.card import ModelCardError, load_card
from models.weights_check import check_weights_file
from models.registry import ZOO, resolve_model_dir, shipped_models
from workflows.analyst_cli import register as register_analyst_commands
from workflows.formats import DatasetFormat

# The libraries behind each command (geopandas, rasterio, Dask, torch …: seconds to import) load in
# the commands that need them, so `seamline --help` and `seamline status` answer at once.

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Seamline: every object in images too big for one model call.")
console = Console()
register_analyst_commands(app)


@app.callback()
def _main() -> None:
    """Seamline: every object in images too big for one model call."""


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _model(model: str | None):
    """(directory, card) of a model directory or shipped name, its weights file checked."""
    model_dir = resolve_model_dir(model)
    card = load_card(model_dir)
    check_weights_file(model_dir, card)
    return model_dir, card


def _tiling(card, tile_size: int | None, overlap: int | None, batch_size: int | None, flips: bool | None, tissue: bool = True):
    """The tiling asked for, the card's where not given (``Tiling`` refuses one no grid can use)."""
    from pipeline.graph import Tiling

    return Tiling(
        tile_size=card.tile_size if tile_size is None else tile_size,
        overlap=card.overlap if overlap is None else overlap,
        batch_size=batch_size,
        tissue_mask=tissue,
        test_time_flips=flips,
    )


def _bands(text: str) -> tuple[int, ...]:
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ValueError(f"--bands {text}: expected 1-based band numbers, e.g. 3,2,1") from None
    if min(bands) < 1:
        raise ValueError(f"--bands {text}: bands are numbered from 1")
    return bands


def _value_range(text: str) -> tuple[float, float]:
    from pipeline.sources import checked_value_range

    try:
        return checked_value_range(text.split(","))
    except ValueError as err:
        raise ValueError(f"--value-range {text}: {err}") from None


def _check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output path that is a file or lies where nothing can be written."""
    if out.exists() and not out.is_dir():
        _fail(f"{out}: exists and is not a directory")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        _fail(f"{out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(f"{out}: {existing} is not writable")


REMOTE = re.compile(r"^(/vsi[a-z0-9_]+/|[A-Za-z][A-Za-z0-9+.-]+:/|[A-Z][A-Z0-9_]+:)")  # https:/ once a Path
FlipsOption = Annotated[Optional[bool], typer.Option("--flips/--no-flips", help="Flip test-time augmentation (4 views per tile, ~4x model time); default from the model card.")]


@app.command()
def run(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(readable=False, help="Images (GeoTIFFs, slides, OME-TIFFs …) to segment, or one workflow YAML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory; one folder per image.")] = Path("seamline-out"),
    model: Annotated[Optional[str], typer.Option(help=f"Model directory or shipped model name ({', '.join(shipped_models())}); default: the demo model synthetic-shapes.")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="Tile (window) size in pixels; default from the model card.")] = None,
    overlap: Annotated[Optional[int], typer.Option(help="Minimum overlap between tiles; default from the model card.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Tiles per model call (one Dask task per batch); default: 16 when segment tasks run on a GPU, else 4.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Dask scheduler address, e.g. tcp://host:8786; default: a local cluster.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=256, help="Worker processes of the local cluster.")] = 1,
    threads: Annotated[Optional[int], typer.Option(min=1, max=256, help="Threads per local worker; default: cores ÷ workers.")] = None,
    bands: Annotated[Optional[str], typer.Option(help="1-based bands (slides: channels) to read, e.g. '3,2,1' or '1'.")] = None,
    value_range: Annotated[Optional[str], typer.Option(help="'LO,HI' mapped to 0-255 for non-8-bit data; default: the model card's input.value_range, else each image's 0.5-99.5th percentiles per band.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    mpp: Annotated[Optional[float], typer.Option(help="Slides and microscopy images (TIFF, PNG, JPEG): level-0 microns per pixel, when files lack it or are wrong (applies to every input).")] = None,
    tissue: Annotated[bool, typer.Option(help="Slides: segment only tiles over tissue found on a thumbnail; --no-tissue: every tile with pixels.")] = True,
    force: Annotated[bool, typer.Option(help="Workflow runs: reprocess every image, even those the ledger has as up to date.")] = False,
    zarr: Annotated[bool, typer.Option(help="Also write labels.zarr (instance and class rasters, pyramid, density grids).")] = True,
    density_cell: Annotated[int, typer.Option(help="Density grid cell in pixels as segmented (a resampled slide's, not level 0's) (labels.zarr).")] = 256,
    flips: FlipsOption = None,
) -> None:
    """Segment IMAGES tile by tile, merge across seams, write GeoPackage + counts per image.

    With one workflow file (.yaml), run it: only new or changed images, recorded in OUT/ledger.sqlite."""
    workflows = [i for i in images if i.suffix.lower() in {".yaml", ".yml"}]
    if workflows:
        if len(images) > 1:
            _fail(f"{workflows[0]}: a workflow file runs alone (one per command), not with other files")
        ignored = [f"--{name.replace('_', '-')}" for name in ctx.params if name not in {"images", "force", "progress", "scheduler"}
                   and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        if ignored:
            _fail(f"{', '.join(ignored)}: a workflow file sets these itself (outputs, model, tiling, read, cluster); "
                  "with it, only --force, --scheduler and --no-progress apply")
        _run_workflow(images[0], force, progress, scheduler)
    try:
        model_dir, card = _model(model)
        tiling = _tiling(card, tile_size, overlap, batch_size, flips, tissue)
        band_list = _bands(bands) if bands else None
        range_pair = _value_range(value_range) if value_range else None
    except ValueError as err:
        _fail(str(err))
    if mpp is not None and not 0 < mpp < math.inf:
        _fail(f"--mpp {mpp} must be a positive number")
    if not 8 <= density_cell <= 65536:
        _fail(f"--density-cell {density_cell} must be between 8 and 65536")
    if remote := [str(i) for i in images if not i.exists() and REMOTE.match(str(i))]:
        _fail(f"{', '.join(remote)}: URLs, GDAL virtual paths (/vsizip/, /vsicurl/ …) and subdataset names are not read; "
              "download or extract the image to a local file first")
    if not any(i.is_file() for i in images):  # nothing to segment: say so before a cluster starts
        _fail("; ".join(f"{i}: a folder; give its images (e.g. {i}/*.tif) or a workflow file" if i.is_dir()
                        else f"{i}: no such file" for i in images))
    _check_output_dir(out)
    report = _run_and_report(list(images), model_dir, card, out, tiling, scheduler, workers, threads, band_list, range_pair,
                             progress, mpp, labels=zarr, density_cell=density_cell)
    raise typer.Exit(0 if report.ok else 1)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DEMO_IMAGE = SHARED_DATA / "nuclei-monuseg2018" / "images" / "TCGA-A6-6782-01A-01-BS1.tif"
REAL_DEMO_ANNOTATION = SHARED_DATA / "nuclei-monuseg2018" / "annotations" / "TCGA-A6-6782-01A-01-BS1.xml"


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo scene and its outputs go.")] = Path("demo-out"),
    size: Annotated[int, typer.Option(help="Side of the generated scene in pixels (synthetic demo).")] = 3000,
    workers: Annotated[int, typer.Option(min=1, max=256, help="Worker processes of the local cluster.")] = 1,
    synthetic: Annotated[bool, typer.Option(help="Use the generated scene even when real data is present.")] = False,
) -> None:
    """Segment a demo image: a real H&E tile with nuclei-he when ../shared/data is present, else a generated scene.

    The H&E tile is a validation image, never trained on; the generated GeoTIFF scene goes to the
    synthetic-shapes demo model."""
    from pipeline.synthetic_raster import write_scene

    if not 64 <= size <= 50_000:
        _fail(f"--size {size} must be between 64 and 50000")
    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if REAL_DEMO_IMAGE.is_file() and not synthetic:
        model_dir = resolve_model_dir("nuclei-he")
        card = load_card(model_dir)
        console.print(f"real image {REAL_DEMO_IMAGE} (MoNuSeg H&E, held out from training), model nuclei-he")
        from pipeline.annotations import imagescope_microns

        tiling = _tiling(card, None, None, None, None)
        mpp = imagescope_microns(REAL_DEMO_ANNOTATION)  # the TIFF records no pixel size; its annotation does
        report = _run_and_report([REAL_DEMO_IMAGE], model_dir, card, out, tiling, None, workers, None, None, None, True, mpp)
        _demo_picture(report)
        raise typer.Exit(0 if report.ok else 1)
    model_dir = resolve_model_dir()
    card = load_card(model_dir)
    scene_path = out / "synthetic-scene.tif"
    scene = write_scene(scene_path, seed=42, height=size, width=size)
    console.print(f"generated {scene_path} ({size}×{size} px, {scene.count} objects)")
    tiling = _tiling(card, None, None, None, None)
    report = _run_and_report([scene_path], model_dir, card, out, tiling, None, workers, None, None, None, True)
    _demo_picture(report)
    raise typer.Exit(0 if report.ok else 1)


def _demo_picture(report) -> None:
    """The demo's result as a picture: polygons coloured by class over the image."""
    import geopandas as gpd

    from pipeline.preview import render_overlay

    for image, summary in report.done.items():
        gpkg = Path(summary["outputs"]["geopackage"])
        png = render_overlay(image, gpd.read_file(gpkg, layer="instances"), gpkg.parent / "preview.png", max_size=1600)
        console.print(f"picture: {png}")


dataset_app = typer.Typer(help="Annotated datasets: statistics before training.")
app.add_typer(dataset_app, name="dataset")

FormatOption = Annotated[DatasetFormat, typer.Option("--format", "-f", help="Annotation format.")]
ImagesOption = Annotated[Path, typer.Option(help="Image file or folder (for coco: the folder the JSON's file names are in).")]
AnnotationsOption = Annotated[Optional[Path], typer.Option(help="Folder of annotations named like the images, or the COCO JSON.")]
ClassOption = Annotated[str, typer.Option(help="Class name for formats without classes.")]
ClassFieldOption = Annotated[Optional[str], typer.Option(help="vector: attribute holding the class.")]


def _load(fmt, images, annotations, class_name, class_field, value_range=None, only=None):
    from pipeline.annotations import AnnotationError
    from pipeline.sources import SourceError
    from workflows.datasets import UnknownImages, load_dataset

    try:
        return load_dataset(fmt, images, annotations, class_name, class_field, value_range, only)
    except (AnnotationError, SourceError) as err:
        _fail(f"--only: {err}" if isinstance(err, UnknownImages) else str(err))


@dataset_app.command("stats")
def dataset_stats_command(
    fmt: FormatOption, images: ImagesOption, annotations: AnnotationsOption = None,
    class_name: ClassOption = "object", class_field: ClassFieldOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of tables.")] = False,
) -> None:
    """Images, instances per class, object sizes and class balance of an annotated dataset."""
    from pipeline.annotations import dataset_stats
    from workflows.dataset_view import stats_view

    stats = dataset_stats(_load(fmt, images, annotations, class_name, class_field))
    if as_json:
        console.print_json(json.dumps(stats, default=float))
    else:
        console.print(stats_view(stats))


@app.command()
def train(
    fmt: FormatOption, images: ImagesOption, out: Annotated[Path, typer.Option(help="Model directory to write.")],
    annotations: AnnotationsOption = None, class_name: ClassOption = "object", class_field: ClassFieldOption = None,
    architecture: Annotated[Optional[str], typer.Option(help="maskrcnn_compact (default), maskrcnn_resnet50_fpn[_v2], maskrcnn_mobilenet_v3_large_fpn; with --init, that model's.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Fine-tune from this model (directory or shipped name) instead of from scratch.")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="Training crop = inference tile size. Default 512 (with --init or --resume, that card's).")] = None,
    minutes: Annotated[float, typer.Option(help="Training time budget (cosine schedule over it).")] = 30.0,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Crops per training step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, cosine schedule).")] = 0.02,
    workers: Annotated[int, typer.Option(min=0, max=64, help="Data-loading processes (0: in the training process).")] = 2,
    val_every: Annotated[int, typer.Option(min=0, help="Hold out every N-th image by sorted name for validation (0: none).")] = 5,
    stain: Annotated[bool, typer.Option(help="H&E stain jitter.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the model already in OUT (without it, training into a model directory is refused).")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when present.")] = None,
    anchors: Annotated[Optional[str], typer.Option(help="Five anchor sizes in pixels, one per FPN level. Default 16,32,64,128,256 (with --init or --resume, that card's).")] = None,
    max_detections: Annotated[Optional[int], typer.Option(min=1, max=10_000, help="Detections per tile (dense nuclei need hundreds). Default 500 (with --init or --resume, that card's).")] = None,
    pack_only: Annotated[bool, typer.Option(help="Only write OUT/train-pack.npz and OUT/model.yaml, for `python -m models.training` on a machine with torch alone (e.g. a GPU box).")] = False,
    checkpoint_minutes: Annotated[float, typer.Option(help="Write OUT/checkpoint.pt this often while training (--resume continues from it).")] = 5.0,
    resolution: Annotated[Optional[float], typer.Option(help="Train at this pixel size (µm for imagescope, else m), resampling every image to it; the model then reads images at it. Default: the first image's own.")] = None,
    value_range: Annotated[Optional[str], typer.Option(help="'LO,HI' mapped to 0-255 for non-8-bit images, kept in the model card so run and evaluate read images the same way. Default: each image's 0.5-99.5th percentiles per band (with --init, that model's range).")] = None,
) -> None:
    """Train (or fine-tune) a Mask R-CNN on annotated images; writes a model directory."""
    import torch
    from pydantic import ValidationError

    from models.card import InputSpec, ModelCard, save_card
    from models.training import RandomCrops, Sample, save_pack, train as train_model
    from pipeline.annotations import AnnotationError, at_resolution, dataset_stats
    from workflows.datasets import split

    if tile_size is not None and (tile_size % 32 or not 64 <= tile_size <= 4096):
        _fail(f"--tile-size {tile_size} must be a multiple of 32 between 64 and 4096")
    for name, value in (("--minutes", minutes), ("--lr", lr), ("--checkpoint-minutes", checkpoint_minutes), ("--resolution", resolution)):
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(f"{name} {value} must be a positive number")
    try:
        anchor_sizes = [int(a) for a in anchors.split(",")] if anchors else None
    except ValueError:
        anchor_sizes = []
    if anchor_sizes is not None and (len(anchor_sizes) != 5 or min(anchor_sizes) < 1):
        _fail(f"--anchors {anchors}: expected five positive sizes in pixels, one per FPN level, e.g. 16,32,64,128,256")
    try:
        range_pair = _value_range(value_range) if value_range else None
    except ValueError as err:
        _fail(str(err))
    try:
        base = load_card(resolve_model_dir(init)) if init else None
    except ValueError as err:
        _fail(f"--init: {err}")
    read_as = base.input if base else InputSpec()  # a fine-tune reads images as its base model did
    if range_pair:
        read_as = read_as.model_copy(update={"value_range": range_pair})
    if base and architecture and architecture != base.architecture:
        _fail(f"--architecture {architecture}: --init {init} is a {base.architecture}, and fine-tuning keeps it")
    _check_output_dir(out)
    if resume and not (out / "checkpoint.pt").is_file():
        _fail(f"--resume: {out / 'checkpoint.pt'} not found (nothing to continue)")
    if (out / "model.yaml").is_file() and not (resume or overwrite or (pack_only and _only_a_pack(out))):
        _fail(f"{out}: already holds a model; --resume continues it, --overwrite replaces it, or choose a new --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.yaml").is_file() and not (overwrite or resume):
        _fail(f"{out}: not empty and not a model directory; training would write over its files (--overwrite allows it)")
    earlier = _card_or_fail(out) if resume and (out / "model.yaml").is_file() else None
    like = earlier or base  # what a resumed run or a fine-tune keeps unless told otherwise
    samples = _load(fmt, images, annotations, class_name, class_field, read_as.value_range)
    pixel_sizes = dataset_stats(samples)["resolution"]  # as `dataset stats` reports them
    if resolution is None and (pixel_sizes["mixed"] or (pixel_sizes["per_unit"] and pixel_sizes["images_without"])):
        known = "; ".join(f"{v['min']:.4g} to {v['max']:.4g} {u}" for u, v in pixel_sizes["per_unit"].items())
        unknown = f", unknown for {len(pixel_sizes['images_without'])}" if pixel_sizes["images_without"] else ""
        console.print(f"[yellow]warning:[/yellow] pixel sizes differ between the images ({known}{unknown}): objects of one "
                      "size appear at several; --resolution puts them on one scale (the card records the first image's)")
    if resolution is not None:
        try:
            samples = [at_resolution(s, resolution) for s in samples]
        except AnnotationError as err:
            _fail(f"--resolution {resolution}: {err}")
    training, held_out = split(samples, val_every)
    if crowded := [s.name for s in training if s.ignore is not None]:
        console.print(f"[yellow]warning:[/yellow] {len(crowded)} training image(s) have crowd regions (iscrowd): "
                      "training sees them as background; evaluate does not score detections on them")
    if not training:
        _fail(f"--val-every {val_every} holds out all {len(samples)} image(s): none is left to train on (use 0 to hold out none)")
    if not any(s.labels.any() for s in training):
        _fail(f"no annotated object in the {len(training)} training image(s): nothing to learn from")
    class_names = samples[0].class_names
    tile_size = tile_size or (like.tile_size if like else 512)
    kept = earlier.model_dump(include=KEPT_ON_RESUME) if earlier else {}
    try:
        card = ModelCard(**{
            **kept, "name": out.name, "architecture": base.architecture if base else architecture or "maskrcnn_compact",
            "classes": class_names, "input": read_as, "tile_size": tile_size, "overlap": max(32, tile_size // 8),
            "resolution": samples[0].resolution, "resolution_unit": samples[0].resolution_unit,
            "max_detections": max_detections or (like.max_detections if like else 500),
            "anchor_sizes": anchor_sizes or (like.anchor_sizes if like else [16, 32, 64, 128, 256]),
        })
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))
    if earlier and (earlier.classes, earlier.anchor_sizes) != (card.classes, card.anchor_sizes):
        _fail(f"--resume: {out} was trained for classes {earlier.classes} with anchors {earlier.anchor_sizes}; these images "
              f"and options give {card.classes} with {card.anchor_sizes}: its heads would be read as other classes or "
              "sizes. Train into a new --out, or --overwrite")
    if overwrite and not resume:  # the replaced model's weights, checkpoint or pack must not pass for this run's
        replaced = _card_in(out)
        for stale in {"checkpoint.pt", "train-pack.npz", card.weights, *([replaced.weights] if replaced else [])}:
            if Path(stale).name == stale:  # files of this folder only
                (out / stale).unlink(missing_ok=True)
    pack = [Sample(s.name, s.image, s.labels, s.classes) for s in training]
    _record_split(out / "split.json", {"train": [s.name for s in training], "validation": [s.name for s in held_out]}, resume)
    if pack_only:
        save_card(card, out)
        save_pack(out / "train-pack.npz", pack, class_names, card.resolution)
        console.print(f"wrote {out / 'train-pack.npz'} and {out / 'model.yaml'}")
        return
    crops = RandomCrops(pack, tile_size, stain=stain)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train_model(card, crops, out, minutes, batch_size, lr, device, workers, resume,
                    init=resolve_model_dir(init) if init else None, checkpoint_minutes=checkpoint_minutes)
    except ValueError as err:  # a checkpoint or --init model that does not fit
        _fail(str(err))
    console.print(f"model written to {out}; validation images: {', '.join(s.name for s in held_out) or 'none'}")


# what a resumed run keeps of its card besides tile size, anchors and detections (which a fine-tune keeps too):
# post-processing chosen for this model, maybe since edited in its card
KEPT_ON_RESUME = {"score_threshold", "mask_threshold", "mask_nms_threshold", "mask_nms_metric", "mask_nms_across_classes",
                  "test_time_flips", "description"}


def _card_or_fail(model_dir: Path):
    try:
        return load_card(model_dir)
    except ModelCardError as err:
        _fail(str(err))


def _card_in(model_dir: Path):
    """``model_dir``'s card, or None when it has no readable one."""
    try:
        return load_card(model_dir)
    except ModelCardError:
        return None


def _only_a_pack(out: Path) -> bool:
    """Whether ``out`` holds what ``train --pack-only`` wrote (a card, its weights not trained yet)."""
    card = _card_in(out)
    return (out / "train-pack.npz").is_file() and card is not None and not (out / card.weights).is_file()


def _record_split(path: Path, recorded: dict, resume: bool) -> None:
    """Write the train/validation split; a resumed training must find the one it began with."""
    from pipeline.writers import atomic_path

    if resume and path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = None
        if earlier != recorded:
            _fail(f"--resume: {path} records another train/validation split than these images give (images added, "
                  "removed or renamed, or another --val-every); validation images would leak into training. "
                  "Train into a new --out, or --overwrite")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(recorded, indent=2))


@app.command()
def evaluate(
    fmt: FormatOption, images: ImagesOption, out: Annotated[Path, typer.Option(help="Report directory.")],
    annotations: AnnotationsOption = None,
    model: Annotated[Optional[str], typer.Option(help="Model directory or shipped name (default: the demo model synthetic-shapes).")] = None,
    class_name: ClassOption = "object", class_field: ClassFieldOption = None,
    only: Annotated[Optional[str], typer.Option(help="Comma-separated image names to score (e.g. a model's validation split).")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="Tile size in pixels; default from the model card.")] = None,
    overlap: Annotated[Optional[int], typer.Option(help="Minimum overlap between tiles; default from the model card.")] = None,
    calibrate: Annotated[bool, typer.Option(help="Write the F1-maximising score threshold found on these images into the model card (calibrate on images the model will not be judged on).")] = False,
    flips: FlipsOption = None,
) -> None:
    """Run the full pipeline on whole annotated images and score it (mAP, F1, PQ, AJI, counts)."""
    from models.weights import ModelWeightsError
    from workflows.evaluate import evaluate as run_evaluation

    try:
        model_dir, card = _model(model)
        tiling = _tiling(card, tile_size, overlap, None, flips)
    except ValueError as err:
        _fail(str(err))
    if calibrate and (model is None or not (Path(model) / "model.yaml").is_file() or model_dir.is_relative_to(ZOO.resolve())):
        _fail(f"--calibrate rewrites the model's card: give a model directory, e.g. a copy of this shipped one (cp -r {model_dir} my-model)")
    _check_output_dir(out)
    samples = _load(fmt, images, annotations, class_name, class_field, card.input.value_range, set(only.split(",")) if only else None)
    try:
        report = run_evaluation(samples, model_dir, card, out, tiling)
    except ModelWeightsError as err:  # evaluate runs in this process: the loader's own error
        _fail(str(err))
    pooled, means = report["summary"], report["summary"]["image_mean"]
    console.print(f"F1@0.5 {pooled['f1']:.3f}  PQ {pooled['pq']:.3f}  AJI {pooled['aji']:.3f}  mask mAP {report['coco']['mask_map']:.3f}  "
                  f"(means over images: F1 {means['f1']:.3f}  PQ {means['pq']:.3f}  AJI {means['aji']:.3f})  → {out / 'report.md'}")
    best = report["calibration"]
    if best["score_threshold"] is not None:
        console.print(f"best F1@0.5 {best['f1']:.3f} at score ≥ {best['score_threshold']:.3f} (card: {card.score_threshold})")
    if calibrate and best["score_threshold"] is not None and best["score_threshold"] != card.score_threshold:
        from models.card import save_card

        threshold = best["score_threshold"]
        save_card(card.model_copy(update={"score_threshold": threshold}), model_dir)
        console.print(f"score_threshold {threshold:.3f} written to {model_dir / 'model.yaml'}")


def _run_workflow(path: Path, force: bool, progress: bool, scheduler: str | None) -> None:
    from workflows.batch import run_workflow
    from workflows.ledger import LedgerError, LedgerLocked
    from workflows.spec import WorkflowError, load_workflow

    try:
        workflow = load_workflow(path)
        if scheduler:
            workflow.cluster.scheduler = scheduler
        outcome = run_workflow(workflow, force=force, show_progress=progress, log=console.print)
    except KeyboardInterrupt as interrupt:  # the workflow's cluster is closed by now
        _discard_interrupted(interrupt)
        console.print("[yellow]interrupted:[/yellow] run the workflow again to resume: images written are kept, and so are the "
                      "segmented batches of the others")
        raise typer.Exit(130) from None
    except (WorkflowError, ModelCardError, LedgerLocked, LedgerError) as err:  # their messages name the file
        _fail(str(err))
    except ValueError as err:  # a setting of the workflow's that does not fit (tiling against the card's tile size)
        _fail(f"{path}: {err}")
    for image, summary in outcome.report.done.items():
        console.print(f"[green]done[/green] {image}: {summary['instances']} instances")
    for message in (m for messages in outcome.report.warnings.values() for m in messages):
        console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)
    for image, error in {**outcome.failed_inputs, **outcome.report.failed}.items():
        console.print(f"[red]failed:[/red] {error}", soft_wrap=True)
    console.print(f"ledger: {workflow.outputs.dir / 'ledger.sqlite'} (seamline status {workflow.outputs.dir})")
    raise typer.Exit(0 if outcome.ok else 1)


@app.command()
def status(out: Annotated[Path, typer.Argument(help="Output directory of a workflow run.")]) -> None:
    """Print the run ledger: per image its status, time, instances and error."""
    from pipeline.sources import image_stem
    from workflows.ledger import LEDGER_NAME, Ledger, LedgerError, run_alive

    if not (out / LEDGER_NAME).is_file():
        _fail(f"{out}: no {LEDGER_NAME} here (not the output directory of a workflow run)")
    try:
        ledger = Ledger(out)
    except LedgerError as err:
        _fail(str(err))
    with ledger:
        alive = run_alive(out)
        rows = [{**row, "status": "interrupted" if row["status"] == "running" and not alive else row["status"]}
                for row in map(dict, ledger.rows())]
    table = Table(title=f"Seamline ledger — {out}")
    for column in ("image", "status", "seconds", "instances", "tiles", "skipped", "resumed"):
        table.add_column(column, justify="left" if column in {"image", "status"} else "right")
    for row in rows:
        name, folder = Path(row["path"]).name, Path(row["output_dir"] or "").name
        served = row["status"] in ("done", "running", "interrupted")  # the others' last counts are no longer served
        table.add_row(
            name if folder in ("", image_stem(name)) else f"{name} → {folder}",  # one name in two folders
            row["status"], f"{row['seconds']:.1f}" if row["seconds"] and served else "",
            *(str(row[c]) if row[c] is not None and served else "" for c in ("instances", "tiles", "tiles_skipped", "batches_resumed")),
        )
    console.print(table)
    for row in rows:
        if row["error"]:
            console.print(f"[red]{row['status']}:[/red] {row['error']}", soft_wrap=True)
    statuses = [row["status"] for row in rows]
    console.print(" · ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses))) or "empty ledger")


def _discard_interrupted(interrupt: KeyboardInterrupt) -> None:
    """What the images a Ctrl-C left unfinished had staged (merge parts, half-written files), once
    nothing writes them; a second Ctrl-C leaves them to the next run, which removes them too."""
    from workflows.run import RunInterrupted

    if isinstance(interrupt, RunInterrupted):
        with suppress(KeyboardInterrupt):
            interrupt.discard_staging()


def _run_and_report(images, model_dir, card, out, tiling, scheduler, workers, threads, bands, value_range, progress, mpp=None,
                    labels=True, density_cell=256):
    """Run on a cluster, print counts per image and failures, and write ``OUT/run.json``."""
    from pipeline.sources import image_stem
    from pipeline.writers import atomic_path
    from workflows.cluster import ClusterError, connect, has_gpu_workers
    from workflows.run import run_images

    try:
        with ExitStack() as stack:
            try:
                client = stack.enter_context(connect(scheduler, workers=workers, threads_per_worker=threads))
            except ClusterError as err:
                _fail(str(err))
            console.print(f"dashboard: {client.dashboard_link}")
            report = run_images(
                client, list(images), model_dir, card, out, tiling,
                bands=bands, value_range=value_range, gpu=has_gpu_workers(client), show_progress=progress, mpp=mpp,
                labels=labels, density_cell=density_cell,
            )
    except KeyboardInterrupt as interrupt:  # the cluster is closed by now
        _discard_interrupted(interrupt)
        console.print("[yellow]interrupted:[/yellow] images already written are kept; run the command again for the others")
        raise typer.Exit(130) from None
    if report.done:
        table = Table(title=f"Seamline — model {card.name}")
        table.add_column("image")
        for name in card.classes:
            table.add_column(name, justify="right")
        table.add_column("total", justify="right")
        table.add_column("outputs")
        for image, summary in report.done.items():
            counts, folder = summary["counts"], Path(summary["outputs"]["geopackage"]).parent
            name = Path(image).name if image_stem(image) == folder.name else f"{Path(image).name} → {folder.name}"  # the id
            shown = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
            table.add_row(name, *(str(counts[c]) for c in card.classes), str(summary["instances"]), str(shown))
        console.print(table)
    for message in (m for messages in report.warnings.values() for m in messages):
        console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)
    if report.model_error:
        console.print(f"[red]failed:[/red] {report.model_error}; {len(report.failed)} image(s) not segmented", soft_wrap=True)
    for image, error in ({} if report.model_error else report.failed).items():
        console.print(f"[red]failed:[/red] {error}", soft_wrap=True)
    try:
        with atomic_path(out / "run.json") as tmp:
            tmp.write_text(json.dumps({"done": report.done, "failed": report.failed}, indent=2))
    except OSError as err:  # a full disk, say: each image's own outputs stand or failed above
        console.print(f"[red]run.json not written:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    if report.model_error:  # the model, not an image, is at fault: nothing was segmented
        raise typer.Exit(2)
    if report.done:
        from workflows.catalogue import build_catalogue

        try:
            console.print(f"catalogue: {build_catalogue(out)} (seamline query {out} …)")
        except Exception as err:  # the per-image outputs stand on their own
            console.print(f"[yellow]catalogue not updated:[/yellow] {type(err).__name__}: {err}")
    console.print(f"outputs: {out.resolve()} (one folder per image; run summary in run.json)")
    return report


def command():
    """The command line as a Click command, its help showing no type for on/off flags (typer's
    default shows ``<bool>`` beside ``--progress / --no-progress``)."""
    root = typer.main.get_command(app)
    commands = [root]
    while commands:
        command = commands.pop()
        commands.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
    return root


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line saying what happened, without the Python source line that raised them."""
    Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(str(message))}")


def main() -> None:
    warnings.showwarning = _print_warning
    command()()


if __name__ == "__main__":
    main()
