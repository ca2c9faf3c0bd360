"""Seamline beside SAHI: same weights, same slices, each tool in its own process.

Cases (each with exact ground truth):

- ``real``: the held-out MoNuSeg 2018 H&E images of the shipped ``nuclei-he`` model (its
  ``split.json`` validation list; 1000² each, ImageScope XML annotations read by
  ``pipeline.annotations``), 384² slices with 48 px overlap (the model card's);
- ``synthetic``: a generated ``--size``² scene (``models.synthetic.make_scene``, in blocks of 5000²
  above that size; written as a GeoTIFF without georeferencing, so outputs are in pixels) with the
  shipped ``synthetic-shapes`` model, 512² slices with 64 px overlap.

Tools, each run by this script in a fresh subprocess (``--tool``), so imports, model loading and
memory peaks are separate; the parent samples the process tree's RSS every 50 ms:

- ``seamline``: ``workflows.run.run_images`` on a LocalCluster of 1 worker process × 2 threads
  (what ``seamline run --no-zarr`` starts, ``MALLOC_TRIM_THRESHOLD_`` unset), GeoPackage written
  (SAHI writes no label raster either); ``seamline-zarr``: the same plus labels.zarr (``seamline run``);
- ``seamline-sync``: the same Dask graph with the synchronous scheduler, in one process;
- every Seamline tool runs without flip test-time augmentation (``nuclei-he``'s card turns it on): SAHI
  calls the module once per slice;
- ``sahi-greedynmm`` / ``sahi-nms``: ``sahi.predict.get_sliced_prediction`` with
  ``TorchVisionDetectionModel`` wrapping the very torch module ``models.inference.Segmenter`` loads
  (same weights, card thresholds), slice size and overlap ratio = the card's tile size and overlap,
  ``postprocess_type`` GREEDYNMM or NMS, match metric IOS at 0.5, class-agnostic when the card's mask NMS
  is (``mask_nms_across_classes``), detections whose
  mask SAHI cannot turn into a polygon dropped first (SAHI raises on them),
  ``perform_standard_pred=False`` (a whole-image pass would feed 4096² pixels to a model trained on
  tiles; on large scenes it does not fit at all).

Scored against the truth with ``tests/helpers.py``'s definitions (sparse implementations in
``benchmarks/common.py``): F1 of one-to-one matches at IoU ≥ 0.5; seam errors = duplicates
(output pairs with IoU > 0.3) and splits (true objects two outputs cover), each counted at a seam
when it meets pixels that two of that tool's slices read, else inside one slice (the model's own
overlapping or over-segmented outputs, which no seam merge causes or removes). An error at a seam
is also looked for in the model's output on the one slice that holds it most centrally (the card's
post-processing, no flips, as Seamline segments a tile): found there too, it is the model's own (an
object it splits even when it sees it whole), and the table gives that count in brackets. SAHI returns OpenCV
contours through pixel centres; they are grown by 0.5 px (mitre) to pixel edges before scoring so
that the polygon convention does not cost SAHI matches (``--raw-sahi`` scores them as returned).

    python benchmarks/sahi_compare.py                                # both cases, 4096² scene
    python benchmarks/sahi_compare.py --cases synthetic --size 8192 --tools seamline sahi-greedynmm
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt_bytes, label_polygons, located_errors, machine, run_measured, table, true_positives  # noqa: E402

TOOLS = ["seamline", "seamline-zarr", "seamline-sync", "sahi-greedynmm", "sahi-nms"]
MONUSEG = ROOT.parent / "shared" / "data" / "nuclei-monuseg2018"


# ------------------------------------------------------------------ the tools (child processes)


def _result(started: float, work: float, polygons: list, out: Path, extra: dict | None = None) -> None:
    np.save(out, np.asarray(shapely.to_wkb(np.asarray(polygons + [None], dtype=object)[:-1]), dtype=object), allow_pickle=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"work_s": work, "process_s": time.perf_counter() - started, "self_peak": peak, **(extra or {})}))


def run_seamline(images: list[Path], model: str, out: Path, sync: bool, labels: bool, started: float) -> None:
    import pyogrio

    from models.card import load_card
    from models.registry import resolve_model_dir
    from pipeline.graph import Tiling

    model_dir = resolve_model_dir(model)
    card = load_card(model_dir)
    tiling = Tiling(card.tile_size, card.overlap, batch_size=4, test_time_flips=False)  # SAHI runs the module once per slice
    work_dir = out.parent / f"{out.stem}-gpkg"
    if sync:
        import dask

        from pipeline.graph import image_graph
        from pipeline.inputs import open_for_model

        start = time.perf_counter()
        summaries = []
        for k, image in enumerate(images):
            graph = image_graph(open_for_model(image, card), str(model_dir), card.classes, work_dir / str(k), tiling)
            summaries += dask.compute(graph.result, scheduler="sync")
        work = time.perf_counter() - start
    else:
        from common import local_cluster
        from workflows.run import run_images

        with local_cluster(1, 2) as client:
            start = time.perf_counter()
            report = run_images(client, images, model_dir, card, work_dir, tiling, show_progress=False, labels=labels)
            work = time.perf_counter() - start
        if not report.ok:
            raise RuntimeError(report.failed)
        summaries = [report.done[str(image)] for image in images]
    from pipeline.grid import TileGrid
    from pipeline.inputs import open_for_model

    windows = []
    for image in images:
        source = open_for_model(image, card)
        windows.append([t.bounds for t in TileGrid(source.height, source.width, card.tile_size, card.overlap).tiles])
    polygons = []
    for summary in summaries:
        frame = pyogrio.read_dataframe(summary["outputs"]["geopackage"], layer="instances")
        polygons.append(list(frame.geometry.values))
    _result(started, work, [p for ps in polygons for p in ps], out, {"per_image": [len(p) for p in polygons], "windows": windows})


class _WithoutEmptyMasks:
    """The module, minus detections whose thresholded mask SAHI cannot turn into a polygon (it raises
    "Invalid segmentation mask." on them; Seamline's ``Segmenter`` drops empty masks as well)."""

    def __init__(self, module, mask_threshold: float) -> None:
        self.module, self.mask_threshold = module, mask_threshold

    def __getattr__(self, name):
        return getattr(self.module, name)

    def to(self, device):  # SAHI keeps what ``model.to(device)`` returns
        self.module.to(device)
        return self

    def __call__(self, images):
        from sahi.utils.cv import get_coco_segmentation_from_bool_mask

        outputs = self.module(images)
        for output in outputs:
            masks = (output["masks"] > self.mask_threshold).cpu().numpy()
            keep = [i for i, mask in enumerate(masks) if get_coco_segmentation_from_bool_mask(mask[0])]
            for key in output:
                output[key] = output[key][keep]
        return outputs


def run_sahi(images: list[Path], model: str, out: Path, postprocess: str, raw: bool, started: float) -> None:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from models.card import load_card
    from models.inference import Segmenter
    from models.registry import resolve_model_dir
    from pipeline.grid import Span
    from pipeline.sources import open_raster, read_window

    start = time.perf_counter()
    model_dir = resolve_model_dir(model)
    card = load_card(model_dir)
    module = Segmenter(model_dir, "cpu").model  # built by models.builders, weights by models.weights
    detector = TorchVisionDetectionModel(
        model=_WithoutEmptyMasks(module, card.mask_threshold), device="cpu", confidence_threshold=card.score_threshold, mask_threshold=card.mask_threshold,
        category_mapping={str(i + 1): name for i, name in enumerate(card.classes)},
    )
    per_image, polygons, windows = [], [], []
    for image in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = open_raster(image)
            pixels, _ = read_window(source, Span(0, source.height), Span(0, source.width))
        result = get_sliced_prediction(
            pixels, detector, slice_height=card.tile_size, slice_width=card.tile_size,
            overlap_height_ratio=card.overlap / card.tile_size, overlap_width_ratio=card.overlap / card.tile_size,
            perform_standard_pred=False, postprocess_type=postprocess, postprocess_match_metric="IOS",
            postprocess_match_threshold=0.5, postprocess_class_agnostic=card.mask_nms_across_classes, verbose=0,
        )
        ratio = card.overlap / card.tile_size
        windows.append(get_slice_bboxes(source.height, source.width, card.tile_size, card.tile_size, False, ratio, ratio))
        found = []
        for prediction in result.object_prediction_list:
            parts = [shapely.Polygon(np.asarray(ring).reshape(-1, 2)) for ring in prediction.mask.segmentation if len(ring) >= 6]
            geometry = shapely.make_valid(shapely.MultiPolygon(parts)) if parts else shapely.Polygon()
            if not raw:
                geometry = geometry.buffer(0.5, join_style="mitre")
            found.append(geometry)
        per_image.append(len(found))
        polygons += found
        del pixels, result
    _result(started, time.perf_counter() - start, polygons, out, {"per_image": per_image, "windows": windows})


# ------------------------------------------------------------------ the parent


def prepare(case: str, size: int, tmp: Path) -> tuple[str, list[Path], list[np.ndarray], str]:
    """(model, image paths, truth polygons per image, description)."""
    if case == "real":
        from pipeline.annotations import read_imagescope_xml

        model = "nuclei-he"
        from models.registry import resolve_model_dir

        names = json.loads((resolve_model_dir(model) / "split.json").read_text())["validation"]
        images = [MONUSEG / "images" / f"{name}.tif" for name in names]
        truth = []
        for image in images:
            sample = read_imagescope_xml(image, MONUSEG / "annotations" / f"{image.stem}.xml")
            truth.append(label_polygons(sample.labels))
        return model, images, truth, f"MoNuSeg held-out H&E, {len(images)} images of 1000², nuclei-he"
    from affine import Affine

    from models.synthetic import make_scene
    from pipeline.synthetic_raster import write_geotiff

    scene = make_scene(7, size, size) if size <= BLOCK else _blocks_scene(size)
    path = tmp / f"scene-{size}.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_geotiff(scene.image, path, crs=None, transform=Affine.identity())
    return "synthetic-shapes", [path], [label_polygons(scene.labels)], f"generated {size}² scene, synthetic-shapes"


BLOCK = 5000  # make_scene holds float64 pixels: a 20k² scene at once needs > 24 GB


def _blocks_scene(size: int):
    """A ``size``² scene put together from ``make_scene`` blocks of at most ``BLOCK``² (ids offset)."""
    from models.synthetic import Scene, make_scene

    image = np.zeros((size, size, 3), np.uint8)
    labels = np.zeros((size, size), np.int32)
    classes = []
    edges = list(range(0, size, BLOCK)) + [size]
    for i, (r0, r1) in enumerate(zip(edges[:-1], edges[1:])):
        for j, (c0, c1) in enumerate(zip(edges[:-1], edges[1:])):
            block = make_scene(7 + 100 * i + j, r1 - r0, c1 - c0)
            image[r0:r1, c0:c1] = block.image
            offset = sum(len(c) for c in classes)
            labels[r0:r1, c0:c1] = np.where(block.labels > 0, block.labels + offset, 0)
            classes.append(block.classes)
    return Scene(image=image, labels=labels, classes=np.concatenate(classes))


@functools.cache
def _segmenter(model: str):
    from models.inference import Segmenter
    from models.registry import resolve_model_dir

    return Segmenter(resolve_model_dir(model), flips=False)


def window_model(image: Path, model: str):
    """A window (x0, y0, x1, y1) of ``image`` → the model's polygons on it alone (image pixels), with
    the card's post-processing and no flips, as Seamline segments one tile."""
    from pipeline.grid import Span
    from pipeline.inputs import open_for_model
    from pipeline.polygons import masks_to_polygons

    @functools.cache  # opened (and the model loaded) only if a seam error asks
    def source():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tool's run already said what it had to about the image
            return open_for_model(image, _segmenter(model).card)

    def run(window: tuple) -> np.ndarray:
        x0, y0, x1, y1 = window
        pixels, _ = source().read(Span(y0, y1), Span(x0, x1))
        found = _segmenter(model)(pixels[None])[0]
        polygons = masks_to_polygons([(c.row, c.col, c.mask) for c in found.masks], pixels.shape[:2], y0, x0)
        return np.asarray([p for p in polygons if p is not None] + [None], dtype=object)[:-1]

    return run


def score(polygons: np.ndarray, result: dict, truth: list[np.ndarray], images: list[Path], model: str) -> dict:
    total = {"found": 0, "truth": 0, "tp": 0}
    start = 0
    for count, true, windows, image in zip(result["per_image"], truth, result["windows"], images):
        predicted = polygons[start : start + count]
        start += count
        predicted = predicted[~shapely.is_empty(predicted)]
        total["tp"] += true_positives(predicted, true)
        total["found"] += len(predicted)
        total["truth"] += len(true)
        for key, n in located_errors(predicted, true, windows, window_model(image, model)).items():
            total[key] = total.get(key, 0) + n
    total["f1"] = 2 * total["tp"] / max(total["found"] + total["truth"], 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["real", "synthetic"], choices=["real", "synthetic"])
    parser.add_argument("--size", type=int, default=4096, help="side of the generated scene")
    parser.add_argument("--tools", nargs="+", default=[t for t in TOOLS if t != "seamline-zarr"], choices=TOOLS)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (tool order alternates); medians")
    parser.add_argument("--raw-sahi", action="store_true", help="score SAHI's contours as returned (no 0.5 px growth)")
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.tool:  # a child: run one tool and report
        started = time.perf_counter()
        if args.tool.startswith("seamline"):
            run_seamline(args.images, args.model, args.out, args.tool == "seamline-sync", args.tool == "seamline-zarr", started)
        else:
            run_sahi(args.images, args.model, args.out, args.tool.split("-")[1].upper(), args.raw_sahi, started)
        return

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in args.cases:
            model, images, truth, description = prepare(case, args.size, tmp)
            runs: dict[str, list[dict]] = {tool: [] for tool in args.tools}
            for repeat in range(args.repeats):
                order = args.tools if repeat % 2 == 0 else args.tools[::-1]
                for tool in order:
                    out = tmp / f"{case}-{tool}-{repeat}.npy"
                    command = [sys.executable, __file__, "--tool", tool, "--model", model, "--out", str(out),
                               "--images", *map(str, images)] + (["--raw-sahi"] if args.raw_sahi else [])
                    measured = run_measured(command)
                    polygons = shapely.from_wkb(np.load(out, allow_pickle=True))
                    measured["score"] = score(polygons, measured["result"], truth, images, model)
                    runs[tool].append(measured)
                    print(f"{case} {tool}: work {measured['result']['work_s']:.1f} s, tree peak "
                          f"{fmt_bytes(measured['tree_peak'])}, F1 {measured['score']['f1']:.3f}", flush=True)
            rows = []
            base = {k: float(np.median([r[k] if k != "work_s" else r["result"]["work_s"] for r in runs[args.tools[0]]]))
                    for k in ("work_s", "tree_peak")}
            for tool, measured in runs.items():
                work = float(np.median([m["result"]["work_s"] for m in measured]))
                wall = float(np.median([m["seconds"] for m in measured]))
                peak = float(np.median([m["tree_peak"] for m in measured]))
                single = float(np.median([m["single_peak"] for m in measured]))
                s = measured[-1]["score"]
                rows.append([
                    tool, f"{work:.1f}", f"{wall:.1f}", f"{work / base['work_s']:.2f}", fmt_bytes(peak),
                    fmt_bytes(single), f"{peak / base['tree_peak']:.2f}", f"{s['found']:,} / {s['truth']:,}",
                    f"{s['f1']:.3f}", f"{s['duplicates_seam']} ({s['duplicates_seam_model']}) / {s['duplicates_interior']}",
                    f"{s['splits_seam']} ({s['splits_seam_model']}) / {s['splits_interior']}",
                ])
            print(f"\n{description}; {args.repeats} run(s) per tool, interleaved")
            print(table(
                ["tool", "work s", "process wall s", f"time ÷ {args.tools[0]}", "peak RSS (process tree)",
                 "largest process", f"peak ÷ {args.tools[0]}", "found / true", "F1@0.5", "duplicates at seams (the model's own) / inside", "splits at seams (the model's own) / inside"],
                rows,
            ))
    print("duplicates: output pairs with IoU > 0.3; splits: true objects two outputs cover; 'at seams' when an output of "
          "the pair (or the split object) meets pixels two of that tool's slices read, else inside one slice; (the model's own): "
          "of those at seams, the ones the model, with the card's post-processing, also makes on the one slice that holds "
          "them most centrally, i.e. not the merge's doing")
    print("work s: reading the image(s) to having the instances (model loading included; Seamline also writes its "
          "GeoPackage); process wall s: the whole subprocess, imports and cluster start-up included")


if __name__ == "__main__":
    main()
