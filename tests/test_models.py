import pickle
import threading

import numpy as np
import pytest
import torch
import yaml

from models.builders import build_model
from models.card import ModelCard, ModelCardError, load_card, save_card
from models.inference import MaskCrop, Segmenter, largest_region, mask_nms, paste_masks_in_boxes
from models.registry import resolve_model_dir
from models.weights import ModelWeightsError, load_weights, save_weights
from tests.helpers import model_variant


def small_card(**changes) -> ModelCard:
    fields = dict(name="t", architecture="maskrcnn_compact", classes=["a", "b"], tile_size=128, overlap=16)
    fields.update(changes)
    return ModelCard(**fields)


@pytest.mark.parametrize(
    "architecture",
    ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_mobilenet_v3_large_fpn", "maskrcnn_compact"],
)
def test_every_architecture_builds_and_segments_at_native_size(architecture):
    card = small_card(architecture=architecture, score_threshold=0.0, max_detections=5)
    model = build_model(card).eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 96, 160)])[0]
    assert out["masks"].shape[-2:] == (96, 160)  # never resized
    assert len(out["scores"]) <= 5
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_card_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ModelCardError, match="no model card"):
        load_card(tmp_path)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"name": "x", "architecture": "vgg", "classes": ["a"]}))
    with pytest.raises(ModelCardError, match=r"model.yaml: architecture"):
        load_card(tmp_path)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"name": "x", "architecture": "maskrcnn_compact", "classes": ["a"], "colour": 1}))
    with pytest.raises(ModelCardError, match="colour"):
        load_card(tmp_path)
    with pytest.raises(ValueError, match="overlap"):
        small_card(overlap=64)


def test_weights_round_trip_and_mismatches_are_explained(tmp_path):
    card = small_card()
    model = build_model(card)
    save_weights(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644  # readable by the workers of other users
    clone = build_model(card)
    load_weights(clone, tmp_path / "w.safetensors", "compact")
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name
    three_classes = build_model(small_card(classes=["a", "b", "c"]))
    with pytest.raises(ModelWeightsError, match="shape mismatch.*cls_score"):
        load_weights(three_classes, tmp_path / "w.safetensors", "compact with 3 classes")
    other = build_model(small_card(architecture="maskrcnn_mobilenet_v3_large_fpn"))
    with pytest.raises(ModelWeightsError, match="missing keys"):
        load_weights(other, tmp_path / "w.safetensors", "mobilenet")
    with pytest.raises(ModelWeightsError, match="not found"):
        load_weights(model, tmp_path / "absent.safetensors", "compact")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelWeightsError, match="not a readable safetensors"):
        load_weights(model, tmp_path / "bad.safetensors", "compact")


def test_torchvision_checkpoints_without_batch_norm_counters_load(tmp_path):
    """torchvision's published Mask R-CNN weights use FrozenBatchNorm2d: no ``num_batches_tracked``."""
    card = small_card(architecture="maskrcnn_resnet50_fpn")
    state = {k: v for k, v in build_model(card).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "coco.pth")
    model = build_model(card)
    load_weights(model, tmp_path / "coco.pth", "resnet50")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for wrapped in ({"state_dict": {f"model.{k}": v for k, v in state.items()}}, {f"module.{k}": v for k, v in state.items()}):
        torch.save(wrapped, tmp_path / "wrapped.pth")  # Lightning's checkpoint, DataParallel's names
        load_weights(build_model(card), tmp_path / "wrapped.pth", "resnet50")
    del state["backbone.body.conv1.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ModelWeightsError, match="1 missing keys .e.g. backbone.body.conv1.weight"):
        load_weights(model, tmp_path / "short.pth", "resnet50")


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_checkpoints_needing_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    model = build_model(small_card())
    with pytest.raises(ModelWeightsError, match="refused"):
        load_weights(model, path, "compact")
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "ok.pt")
    load_weights(build_model(small_card()), tmp_path / "ok.pt", "compact")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "tutorial.pt")  # as tutorials save them
    load_weights(build_model(small_card()), tmp_path / "tutorial.pt", "compact")
    torch.save({"weights": model.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ModelWeightsError, match="other.pt: expected a state_dict of tensors .* found keys weights"):
        load_weights(build_model(small_card()), tmp_path / "other.pt", "compact")


def test_weights_that_would_fail_every_task_are_refused_before_any_work_without_torch(tmp_path):
    """Read from the file's bytes (zip archive, pickle opcodes, safetensors header): nothing unpickled."""
    from models.card import ModelCardError
    from models.weights_check import check_weights_file

    card = small_card()
    model = build_model(card)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    assert check_weights_file(tmp_path, card.model_copy(update={"weights": "state.pt"})) == tmp_path / "state.pt"
    torch.save(model, tmp_path / "whole.pt")  # the whole model object
    with pytest.raises(ModelCardError, match=r"whole.pt: holds pickled objects .*torch.nn.modules.*save model.state_dict\(\)"):
        check_weights_file(tmp_path, card.model_copy(update={"weights": "whole.pt"}))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:-5000])
    with pytest.raises(ModelCardError, match="cut.pt: not a readable torch checkpoint, truncated or corrupt"):
        check_weights_file(tmp_path, card.model_copy(update={"weights": "cut.pt"}))
    save_weights(model, tmp_path / "w.safetensors")
    with pytest.raises(ModelCardError, match=r"w.safetensors: weights for 2 classes, the card lists 3 \(a, b, c\)"):
        check_weights_file(tmp_path, card.model_copy(update={"weights": "w.safetensors", "classes": ["a", "b", "c"]}))
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-100])
    with pytest.raises(ModelCardError, match="short.safetensors: not a readable safetensors file .truncated"):
        check_weights_file(tmp_path, card.model_copy(update={"weights": "short.safetensors"}))


def test_pasted_masks_land_where_the_mask_head_learned_them():
    """Masks made into training targets the way torchvision's Mask R-CNN makes them
    (``project_masks_on_boxes``: ``roi_align`` of the mask over its box) and pasted back into their
    boxes come back on their objects: no half-pixel shift up-left (torchvision's
    ``paste_masks_in_image`` has one), objects cut by the tile edge clipped, crops box-local."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    ours, theirs = [], []
    for k in range(60):
        (cy, cx), radius, squash = rng.uniform(-5, 133, 2) if k % 4 == 0 else rng.uniform(20, 108, 2), rng.uniform(4, 15), rng.uniform(0.6, 1)
        disk = ((yy - cy) / squash) ** 2 + (xx - cx) ** 2 <= radius**2
        if disk.sum() < 10:
            continue
        rows, cols = np.flatnonzero(disk.any(1)), np.flatnonzero(disk.any(0))
        box = torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=torch.float32)  # as models.training
        target = project_masks_on_boxes(torch.from_numpy(disk)[None].float(), box, torch.tensor([0]), 28)[:, None]
        (crop,) = paste_masks_in_boxes(target, box, 128, 128, 0.5)
        h, w = crop.mask.shape
        assert 0 <= crop.row and crop.row + h <= 128 and 0 <= crop.col and crop.col + w <= 128
        pasted = np.zeros((128, 128), bool)
        pasted[crop.row : crop.row + h, crop.col : crop.col + w] = crop.mask
        assert (pasted & disk).sum() / (pasted | disk).sum() > 0.95, (cy, cx, radius)
        if k % 4:  # whole objects: their centroids tell where a paste puts them
            ours.append(np.argwhere(pasted).mean(0) - np.argwhere(disk).mean(0))
            old = paste_masks_in_image(target, box, (128, 128), padding=1)[0, 0].numpy() > 0.5
            theirs.append(np.argwhere(old).mean(0) - np.argwhere(disk).mean(0))
    assert (np.abs(np.mean(ours, 0)) < 0.05).all() and (np.mean(theirs, 0) < -0.3).all()


def _square(row: int, col: int, size: int) -> MaskCrop:
    return MaskCrop(row, col, np.ones((size, size), bool))


def test_mask_nms_is_greedy_by_score_within_a_class():
    crops = [
        _square(0, 0, 10),  # A
        _square(1, 0, 10),  # B: IoU 9/11 with A
        _square(0, 8, 10),  # C: IoU 2/18 with A, 2/... with B: kept
        _square(0, 0, 10),  # D: A's pixels, other class
        _square(2, 0, 10),  # E: IoU 8/12 with A, 9/11 with B (B is gone: A alone decides)
        _square(40, 40, 3),  # F: alone
    ]
    labels = np.array([0, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.95, 0.7, 0.5, 0.6, 0.1])
    # B outranks A and suppresses it (9/11); E then meets only B: 8/12 >= 0.5
    assert mask_nms(crops, labels, scores, 0.5).tolist() == [1, 2, 3, 5]
    # at 0.7 B suppresses A (0.82) and E (0.82 with B), keeps C
    assert mask_nms(crops, labels, scores, 0.7).tolist() == [1, 2, 3, 5]
    # at 0.9 nothing overlaps enough
    assert mask_nms(crops, labels, scores, 0.9).tolist() == [0, 1, 2, 3, 4, 5]
    # intersection over the smaller mask: a fragment inside a bigger mask goes, whatever its IoU
    inner = [_square(0, 0, 10), MaskCrop(2, 2, np.ones((4, 4), bool))]
    assert mask_nms(inner, labels[:2], np.array([0.5, 0.9]), 0.5).tolist() == [0, 1]  # IoU 0.16
    assert mask_nms(inner, labels[:2], np.array([0.5, 0.9]), 0.9, "ios").tolist() == [1]
    # ties: the earlier mask wins
    assert mask_nms(crops[:2], labels[:2], np.array([0.5, 0.5]), 0.5).tolist() == [0]


def test_mask_nms_judges_a_mask_by_the_region_its_polygon_keeps():
    """A mask over one object plus stray blobs elsewhere becomes that object's polygon: it is a
    duplicate of the object's own mask although the whole masks' IoU is below the threshold."""
    whole = _square(10, 10, 20)  # 400 px
    spread = np.zeros((60, 60), bool)
    spread[0:20, 0:21] = True  # 420 px over the object (rows 10-30, cols 10-31)
    spread[30:44, 30:44] = True  # two stray blobs of 196 px
    spread[46:60, 46:60] = True
    crops = [whole, MaskCrop(10, 10, spread)]
    whole_iou = 400 / (400 + spread.sum() - 400)
    assert whole_iou < 0.5
    assert mask_nms(crops, np.zeros(2, np.int16), np.array([0.9, 0.8]), 0.5).tolist() == [0]
    from pipeline.polygons import mask_to_polygon

    assert mask_to_polygon(spread, 10, 10).area == 420  # what the second mask would have become


def test_mask_nms_from_the_card_removes_overlapping_outputs(tmp_path):
    """An untrained model's outputs overlap heavily; the card's threshold removes exactly those."""
    from models.synthetic import make_scene

    torch.manual_seed(0)
    untrained = ModelCard(name="untrained", architecture="maskrcnn_compact", classes=["a"], tile_size=256,
                          overlap=32, score_threshold=0.0)
    save_weights(build_model(untrained), tmp_path / "weights.safetensors")
    found = {}
    for name, threshold in (("loose", None), ("strict", 0.2)):
        directory = tmp_path / name
        card = untrained.model_copy(update={"mask_nms_threshold": threshold})
        save_card(card, directory)
        (directory / card.weights).symlink_to(tmp_path / "weights.safetensors")
        found[name] = Segmenter(directory, device="cpu")(make_scene(7, 256, 256).image[None])[0]

    def masks(instances):  # what each becomes: its largest region (see the test below)
        out = []
        for crop in map(largest_region, instances.masks):
            full = np.zeros((256, 256), bool)
            full[crop.row : crop.row + crop.mask.shape[0], crop.col : crop.col + crop.mask.shape[1]] = crop.mask
            out.append(full)
        return out

    def worst_overlap(instances):
        full = masks(instances)
        return max(
            ((a & b).sum() / (a | b).sum() for i, a in enumerate(full) for j, b in enumerate(full)
             if i < j and instances.labels[i] == instances.labels[j]),
            default=0.0,
        )

    assert worst_overlap(found["loose"]) >= 0.2  # something to suppress
    assert 0 < len(found["strict"]) < len(found["loose"])
    assert worst_overlap(found["strict"]) < 0.2
    kept = {(round(float(s), 6), int(l)) for s, l in zip(found["strict"].scores, found["strict"].labels)}
    assert kept <= {(round(float(s), 6), int(l)) for s, l in zip(found["loose"].scores, found["loose"].labels)}


def test_shipped_model_detects_synthetic_objects():
    from models.synthetic import make_scene
    from models.train_synthetic import mask_f1

    segmenter = Segmenter(resolve_model_dir(), device="cpu")
    assert segmenter.card.name == "synthetic-shapes"
    scene = make_scene(123, 512, 512)
    found = segmenter(scene.image[None])[0]
    assert abs(len(found) - scene.count) <= max(3, scene.count // 5)
    assert mask_f1(segmenter, range(3), 512) >= 0.8


def test_worker_threads_asking_at_once_share_one_loaded_model(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from models import inference

    model_variant(tmp_path / "fresh", "synthetic-shapes")  # a path no earlier test cached
    loads = []

    class CountedSegmenter(Segmenter):
        def __init__(self, *args, **kwargs):
            loads.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(inference, "Segmenter", CountedSegmenter)
    start = threading.Barrier(4)

    def ask(_):
        start.wait()
        return inference.cached_segmenter(str(tmp_path / "fresh"), "cpu")

    with ThreadPoolExecutor(4) as pool:
        segmenters = list(pool.map(ask, range(4)))
    assert len(loads) == 1
    assert all(s is segmenters[0] for s in segmenters)


def test_card_round_trips_through_yaml(tmp_path):
    card = small_card(resolution=0.5, resolution_unit="m")
    save_card(card, tmp_path)
    assert load_card(tmp_path) == card



@pytest.mark.parametrize("across", [False, True])
def test_mask_nms_across_classes_keeps_one_of_an_object_given_two_classes(tmp_path, across):
    model_variant(tmp_path, "synthetic-shapes", mask_nms_threshold=0.5, mask_nms_across_classes=across)
    segmenter = Segmenter(tmp_path, device="cpu")
    masks = torch.zeros(3, 1, 28, 28)
    masks[:, :, 4:24, 4:24] = 1.0
    detections = {  # one square guessed as two classes, and another class's square elsewhere
        "boxes": torch.tensor([[10.0, 10, 50, 50], [11, 10, 51, 50], [100, 100, 140, 140]]),
        "labels": torch.tensor([1, 2, 2]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "masks": masks,
    }
    found = segmenter._select(segmenter._fetch(detections, 256, 256))
    expected = [0.9, 0.7] if across else [0.9, 0.8, 0.7]
    assert np.allclose(found.scores, expected)


def test_host_work_runs_outside_the_device_lock(tmp_path, monkeypatch):
    """On a GPU one batch holds the device at a time; mask NMS and the other host-side work of a
    finished batch must not keep the next batch (another worker thread's) waiting."""
    from models import inference
    from models.synthetic import make_scene

    model_variant(tmp_path, "synthetic-shapes", mask_nms_threshold=0.5)
    segmenter = Segmenter(tmp_path, device="cpu")
    segmenter._lock = threading.Lock()  # what a CUDA segmenter holds
    held = []

    def recording_nms(*args, **kwargs):
        held.append(segmenter._lock.locked())
        return mask_nms(*args, **kwargs)

    monkeypatch.setattr(inference, "mask_nms", recording_nms)
    tiles = np.stack([make_scene(seed, 256, 256).image for seed in (3, 4)])
    found = segmenter(tiles)
    assert held == [False, False] and all(len(f) for f in found)


@pytest.mark.parametrize("flips", [False, True])
def test_the_autocast_path_of_a_gpu_finds_what_full_precision_finds(monkeypatch, flips):
    """On CUDA the model runs under autocast (reduced-precision convolutions and heads, float32
    where torch keeps it). The same path, on the CPU in bfloat16, must run through the heads, the
    flip fusion and the mask paste without a dtype clash, and find the same objects."""
    from torchvision.ops import box_iou

    from models.synthetic import make_scene

    segmenter = Segmenter(resolve_model_dir(), device="cpu", flips=flips)
    tiles = np.stack([make_scene(seed, 256, 256).image for seed in (3, 4)])
    full = segmenter(tiles)
    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, enabled=True: autocast("cpu", dtype=torch.bfloat16))
    reduced = segmenter(tiles)
    for a, b in zip(full, reduced):
        assert len(a) > 0 and b.boxes.dtype == np.float32 and all(m.mask.dtype == bool for m in b.masks)
        overlap = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes))
        assert (overlap.amax(1) > 0.7).float().mean() >= 0.9 and abs(len(a) - len(b)) <= max(1, len(a) // 10)


def test_a_gpu_out_of_memory_halves_the_batch_and_keeps_it_halved(monkeypatch):
    """CUDA runs a batch in one pass; a batch that does not fit is run in halves, and later batches
    no larger, so every tile is segmented once, in order. One tile that does not fit is named."""
    from models.inference import TileInstances

    segmenter = Segmenter(resolve_model_dir(), device="cpu")
    segmenter.device = torch.device("cuda")  # the batching of a CUDA segmenter; the passes are simulated
    passes = []

    def forward(tiles):
        passes.append(len(tiles))
        if len(tiles) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [TileInstances(np.full((1, 4), t[0, 0, 0], np.float32), np.zeros(1, np.int16), np.ones(1, np.float32), [])
                for t in tiles]

    monkeypatch.setattr(segmenter, "_forward", forward)
    tiles = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((8, 16, 16, 3), np.uint8)
    fits = 2
    found = segmenter(tiles)
    assert passes == [8, 4, 2, 2, 2, 2] and [int(f.boxes[0, 0]) for f in found] == list(range(8))
    passes.clear()
    assert len(segmenter(tiles[:4])) == 4 and passes == [2, 2]
    fits = 0
    with pytest.raises(MemoryError, match="one 16x16 tile does not fit in the memory of cuda"):
        segmenter(tiles[:1])


def test_caps_on_proposals_and_detections_grow_with_the_tile_area(tmp_path):
    """The card sets its caps for its own tile; a tile of four times the area gets four times the
    proposals and detections, the card's tile and smaller ones the card's, and the model itself is
    never changed (threads share it)."""
    from models.synthetic import make_scene

    model_variant(tmp_path, "synthetic-shapes", max_detections=20)
    segmenter = Segmenter(tmp_path, device="cpu")
    rpn, heads = segmenter.model.rpn, segmenter.model.roi_heads
    large = segmenter.model_for(1024, 1024)
    assert large.roi_heads.detections_per_img == 80 and heads.detections_per_img == 20
    assert large.rpn.post_nms_top_n() == 4 * rpn.post_nms_top_n() and large.rpn.pre_nms_top_n() == 4 * rpn.pre_nms_top_n()
    assert segmenter.model_for(512, 512) is segmenter.model_for(300, 400) is segmenter.model
    assert large.backbone is segmenter.model.backbone and segmenter.model.rpn is rpn and segmenter.model.roi_heads is heads
    scene = make_scene(7, 1024, 1024, density=1.5, size_range=(16, 60))
    found = segmenter(scene.image[None])[0]
    assert 20 < len(found) <= 80 and len(segmenter(scene.image[None, :512, :512])[0]) <= 20


@pytest.mark.parametrize("architecture", ["maskrcnn_compact", "maskrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn"])
def test_the_cards_roi_sampling_reaches_both_heads(architecture):
    card = ModelCard(name="m", architecture=architecture, classes=["a"], roi_sampling_ratio=1)
    heads = build_model(card).roi_heads
    assert heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio == 1
    assert build_model(card.model_copy(update={"roi_sampling_ratio": 3})).roi_heads.mask_roi_pool.sampling_ratio == 3


def test_one_roi_sample_per_bin_finds_the_same_objects(tmp_path):
    """A quarter of torchvision's RoIAlign sampling (what nuclei-he and nuclei-fluo run with) reads the
    heads' features a little differently, not other objects."""
    from torchvision.ops import box_iou

    from models.synthetic import make_scene

    model_variant(tmp_path, "synthetic-shapes", roi_sampling_ratio=1)
    tiles = np.stack([make_scene(seed, 256, 256).image for seed in (3, 4)])
    for a, b in zip(Segmenter(resolve_model_dir(), device="cpu")(tiles), Segmenter(tmp_path, device="cpu")(tiles)):
        overlap = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes))
        assert len(a) > 0 and (overlap.amax(1) > 0.8).float().mean() >= 0.9 and abs(len(a) - len(b)) <= max(1, len(a) // 10)
        assert not np.array_equal(a.scores, b.scores)  # the heads did sample differently


def test_channels_last_inference_finds_what_the_plain_model_finds():
    from models.synthetic import make_scene

    segmenter = Segmenter(resolve_model_dir(), device="cpu")
    assert segmenter.model.backbone.body.stem[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = Segmenter(resolve_model_dir(), device="cpu")
    plain.model = plain.model.to(memory_format=torch.contiguous_format)
    tiles = np.stack([make_scene(seed, 256, 256).image for seed in (3, 4)])
    for fast, reference in zip(segmenter(tiles), plain(tiles)):
        assert len(fast) == len(reference) > 0
        np.testing.assert_allclose(fast.boxes, reference.boxes, atol=0.05)
        np.testing.assert_allclose(fast.scores, reference.scores, atol=1e-3)
        for a, b in zip(fast.masks, reference.masks):
            assert (a.row, a.col) == (b.row, b.col) and (a.mask != b.mask).sum() <= 2
