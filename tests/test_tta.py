import numpy as np
import pytest
import torch

from models.inference import Segmenter, paste_masks_in_boxes
from models.registry import resolve_model_dir
from models.synthetic import make_scene
from models.tta import FLIPS, _flip_boxes, _fuse, flip_tta
from tests.helpers import model_variant


def test_fused_score_is_the_mean_over_views_and_the_box_score_weighted():
    boxes = torch.tensor([[10.0, 10, 30, 30], [12, 10, 32, 30], [11, 10, 31, 30], [60, 60, 80, 80]])
    scores = torch.tensor([0.8, 0.6, 0.4, 0.9])
    labels = torch.tensor([1, 1, 1, 1])
    view = torch.tensor([0, 1, 1, 2])  # view 1 matched the first object twice: only its best counts
    fused_boxes, fused_scores, fused_labels = _fuse(boxes, scores, labels, view, 0.5, 100)
    order = torch.argsort(fused_scores, descending=True)
    assert torch.allclose(fused_scores[order], torch.tensor([(0.8 + 0.6) / 4, 0.9 / 4]))
    expected_x0 = (10 * 0.8 + 12 * 0.6 + 11 * 0.4) / (0.8 + 0.6 + 0.4)
    assert torch.allclose(fused_boxes[order][0], torch.tensor([expected_x0, 10, expected_x0 + 20, 30]))
    assert torch.equal(fused_boxes[order][1], boxes[3])
    assert fused_labels.tolist() == [1, 1]


def test_another_class_is_another_object():
    boxes = torch.tensor([[10.0, 10, 30, 30], [10, 10, 30, 30]])
    _, scores, labels = _fuse(boxes, torch.tensor([0.8, 0.7]), torch.tensor([1, 2]), torch.tensor([0, 1]), 0.5, 100)
    assert sorted(labels.tolist()) == [1, 2]
    assert torch.allclose(torch.sort(scores).values, torch.tensor([0.7 / 4, 0.8 / 4]))


def test_flipping_boxes_twice_returns_them():
    boxes = torch.tensor([[3.0, 5, 20, 9]])
    for lr, ud in FLIPS:
        flipped = _flip_boxes(boxes, lr, ud, 64, 48)
        assert torch.equal(_flip_boxes(flipped, lr, ud, 64, 48), boxes)
    assert torch.equal(_flip_boxes(boxes, True, False, 64, 48), torch.tensor([[28.0, 5, 45, 9]]))


def test_flip_tta_is_equivariant_under_the_flips_it_averages():
    """The four flips form a group: segmenting a mirrored tile gives the mirrored result."""
    segmenter = Segmenter(resolve_model_dir("synthetic-shapes"), device="cpu")
    image = torch.from_numpy(make_scene(5, 512, 512).image).permute(2, 0, 1).float() / 255
    threshold = segmenter.card.score_threshold
    plain = flip_tta(segmenter.model, [image], threshold)[0]
    mirrored = flip_tta(segmenter.model, [image.flip(-1)], threshold)[0]
    assert len(plain["scores"]) > 5 and len(plain["scores"]) == len(mirrored["scores"])
    a, b = torch.argsort(plain["scores"]), torch.argsort(mirrored["scores"])
    assert torch.allclose(plain["scores"][a], mirrored["scores"][b], atol=1e-4)
    assert torch.allclose(_flip_boxes(mirrored["boxes"][b], True, False, 512, 512), plain["boxes"][a], atol=0.05)
    assert torch.equal(plain["labels"][a], mirrored["labels"][b])
    # the pixels each mask covers, mirrored back, are nearly the plain tile's (the maps themselves
    # sample pixel centres, half a pixel right of each box in either image: they are not mirror images)
    overlaps = []
    for crop, back in zip(paste_masks_in_boxes(plain["masks"][a], plain["boxes"][a], 512, 512, 0.5),
                          paste_masks_in_boxes(mirrored["masks"][b], mirrored["boxes"][b], 512, 512, 0.5)):
        one, other = np.zeros((512, 512), bool), np.zeros((512, 512), bool)
        one[crop.row : crop.row + crop.mask.shape[0], crop.col : crop.col + crop.mask.shape[1]] = crop.mask
        other[back.row : back.row + back.mask.shape[0], back.col : back.col + back.mask.shape[1]] = back.mask
        overlaps.append((one & other[:, ::-1]).sum() / (one | other[:, ::-1]).sum())
    assert min(overlaps) > 0.9 and np.mean(overlaps) > 0.97



def test_flip_tta_never_changes_the_shared_model():
    """Worker threads run one model side by side: a call that lowered the shared score threshold
    while another thread was inferring changed that thread's detections (counts varied by one
    between identical runs)."""
    segmenter = Segmenter(resolve_model_dir("synthetic-shapes"), device="cpu")
    model = segmenter.model
    original = model.roi_heads.score_thresh
    seen = []
    hook = model.rpn.register_forward_hook(lambda *_: seen.append(model.roi_heads.score_thresh))
    image = torch.from_numpy(make_scene(6, 256, 256).image).permute(2, 0, 1).float() / 255
    flip_tta(model, [image], 0.5)
    hook.remove()
    assert seen == [original] * len(FLIPS) and model.roi_heads.score_thresh == original


def test_a_blank_tile_beside_a_busy_one_gives_nothing():
    segmenter = Segmenter(resolve_model_dir("synthetic-shapes"), device="cpu")
    busy = torch.from_numpy(make_scene(5, 256, 256).image).permute(2, 0, 1).float() / 255
    blank, found = flip_tta(segmenter.model, [torch.zeros_like(busy), busy], segmenter.card.score_threshold)
    assert len(blank["scores"]) == 0 and blank["masks"].shape[0] == 0
    assert len(found["scores"]) > 0 and found["masks"].shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("flips", [False, True])
def test_segmenter_with_flips_from_the_card_finds_the_objects(tmp_path, flips):
    from models.train_synthetic import mask_f1

    card = model_variant(tmp_path, "synthetic-shapes", test_time_flips=flips)
    segmenter = Segmenter(tmp_path, device="cpu")
    found = segmenter(make_scene(123, 512, 512).image[None])[0]
    assert len(found) and np.all(found.scores >= card.score_threshold)
    assert mask_f1(segmenter, range(2), 512) >= 0.8


def test_tiling_overrides_the_cards_flip_setting(tmp_path):
    """``seamline run --flips`` on a card without flips gives what a card with flips gives."""
    import dask
    import pyogrio
    from affine import Affine

    from pipeline.graph import Tiling, image_graph
    from pipeline.sources import open_raster
    from pipeline.synthetic_raster import write_geotiff

    path = write_geotiff(make_scene(11, 640, 640).image, tmp_path / "scene.tif", crs=None, transform=Affine.identity())
    outputs = {}
    for name, card_flips, run_flips in (("card", True, None), ("override", False, True), ("plain", True, False)):
        model = tmp_path / f"model-{name}"
        card = model_variant(model, "synthetic-shapes", test_time_flips=card_flips)
        tiling = Tiling(card.tile_size, card.overlap, 4, test_time_flips=run_flips)
        dask.compute(image_graph(open_raster(path), str(model), card.classes, tmp_path / name, tiling).result, scheduler="sync")
        outputs[name] = pyogrio.read_dataframe(tmp_path / name / "instances.gpkg", layer="instances")
    assert len(outputs["card"]) > 10
    assert outputs["card"].geometry.values.tolist() == outputs["override"].geometry.values.tolist()
    assert outputs["card"]["score"].tolist() == outputs["override"]["score"].tolist()
    assert outputs["card"]["score"].tolist() != outputs["plain"]["score"].tolist()


@pytest.mark.parametrize("flips", [False, True])
def test_segmented_masks_sit_on_their_objects(flips):
    """The shipped demo model's masks on generated scenes: no half-pixel shift (torchvision's paste
    put every mask ~0.5 px up and left, and flipped views' maps a pixel apart before averaging)."""
    segmenter = Segmenter(resolve_model_dir("synthetic-shapes"), device="cpu", flips=flips)
    offsets, overlaps = [], []
    for seed in (100, 101):
        scene = make_scene(seed, 512, 512)
        (found,) = segmenter(scene.image[None])
        for crop in found.masks:
            mask = np.zeros((512, 512), bool)
            mask[crop.row : crop.row + crop.mask.shape[0], crop.col : crop.col + crop.mask.shape[1]] = crop.mask
            ids, counts = np.unique(scene.labels[mask], return_counts=True)
            truth = scene.labels == ids[np.argmax(counts)]
            if ids[np.argmax(counts)] and (truth & mask).sum() / (truth | mask).sum() > 0.5:
                offsets.append(np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))
                overlaps.append((truth & mask).sum() / (truth | mask).sum())
    assert len(offsets) > 20
    assert (np.abs(np.mean(offsets, 0)) < 0.2).all() and np.mean(overlaps) > 0.93
