import re

import numpy as np
import pytest
import torch

from models.card import ModelCard
from models.inference import Segmenter
from models.synthetic import make_scene
from models.training import RandomCrops, Sample, load_pack, save_pack, train, training_target


def tiny_samples():
    scenes = [make_scene(seed, 256, 256, density=2.0, size_range=(10, 40)) for seed in range(3)]
    return [Sample(f"s{i}", s.image, s.labels, s.classes) for i, s in enumerate(scenes)]


def test_pack_round_trip_without_pickle(tmp_path):
    samples = tiny_samples()
    save_pack(tmp_path / "pack.npz", samples, ["ellipse", "rectangle", "triangle"], 0.25)
    loaded, names, resolution = load_pack(tmp_path / "pack.npz")
    assert names == ["ellipse", "rectangle", "triangle"] and resolution == 0.25
    for a, b in zip(samples, loaded):
        assert a.name == b.name and np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_targets_have_tight_boxes():
    labels = np.zeros((20, 30), np.int32)
    labels[2:5, 3:9] = 1
    labels[10:20, 25:30] = 2
    target = training_target(labels, np.array([0, 2], np.int16), min_area=1)
    assert target["boxes"].tolist() == [[3, 2, 9, 5], [25, 10, 30, 20]]
    assert target["labels"].tolist() == [1, 3]
    assert target["masks"].sum((1, 2)).tolist() == [18, 50]


def test_loss_falls_and_checkpoint_resumes(tmp_path):
    torch.manual_seed(0)
    card = ModelCard(name="tiny", architecture="maskrcnn_compact", classes=["ellipse", "rectangle", "triangle"],
                     tile_size=128, overlap=16, anchor_sizes=[8, 16, 32, 64, 128])
    crops = RandomCrops(tiny_samples(), crop=128, seed=1)
    log = train(card, crops, tmp_path / "m", minutes=10, batch_size=2, lr=0.01, workers=0, max_steps=60, log_every=1, progress=False)
    losses = [row["loss"] for row in log]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert int(state["step"]) == 60
    log = train(card, crops, tmp_path / "m", minutes=10, batch_size=2, lr=0.01, workers=0, max_steps=65, log_every=1, resume=True, progress=False)
    assert [row["step"] for row in log][-5:] == [61, 62, 63, 64, 65]
    segmenter = Segmenter(tmp_path / "m", device="cpu")
    assert segmenter(np.zeros((1, 128, 128, 3), np.uint8))[0].boxes.shape[1] == 4
    one_class = card.model_copy(update={"classes": ["shape"]})
    with pytest.raises(ValueError, match=r"checkpoint\.pt: written for another model than this one \(size mismatch"):
        train(one_class, crops, tmp_path / "m", minutes=10, batch_size=2, lr=0.01, workers=0, max_steps=66, resume=True, progress=False)


class DiesAfter(torch.utils.data.IterableDataset):
    """The crops of ``crops`` until ``items`` have been drawn, then the error a lost data source raises."""

    def __init__(self, crops, items):
        self.crops, self.items = crops, items

    def __iter__(self):
        for n, item in enumerate(self.crops):
            if n == self.items:
                raise OSError("data source lost")
            yield item


def test_a_run_that_dies_resumes_from_its_last_periodic_checkpoint(tmp_path):
    torch.manual_seed(0)
    card = ModelCard(name="tiny", architecture="maskrcnn_compact", classes=["ellipse", "rectangle", "triangle"],
                     tile_size=128, overlap=16, anchor_sizes=[8, 16, 32, 64, 128])
    crops = RandomCrops(tiny_samples(), crop=128, seed=1)
    settings = dict(minutes=10, batch_size=2, lr=0.01, workers=0, log_every=1, progress=False)
    try:
        train(card, DiesAfter(crops, 2 * 7), tmp_path / "m", max_steps=20, checkpoint_minutes=0, **settings)
    except OSError:
        pass
    else:
        raise AssertionError("the data source should have failed")
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert int(state["step"]) == 7
    assert not list((tmp_path / "m").glob(".*partial"))
    log = train(card, crops, tmp_path / "m", max_steps=10, resume=True, **settings)
    assert [row["step"] for row in log] == list(range(1, 11))
    written = (tmp_path / "m" / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in written] == ["step", *map(str, range(1, 11))]  # 7, not 7.0, after the resume
    assert not list((tmp_path / "m").glob(".*partial"))
    assert int(torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["step"]) == 10


def test_progress_reports_the_loss_at_every_checkpoint(tmp_path, capsys):
    """A batch job has no terminal to draw the bar on: each periodic checkpoint prints a line."""
    card = ModelCard(name="tiny", architecture="maskrcnn_compact", classes=["ellipse", "rectangle", "triangle"],
                     tile_size=128, overlap=16, anchor_sizes=[8, 16, 32, 64, 128])
    crops = RandomCrops(tiny_samples(), crop=128, seed=1)
    train(card, crops, tmp_path / "m", minutes=10, batch_size=2, lr=0.01, workers=0, max_steps=3, log_every=1,
          checkpoint_minutes=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith("; checkpoint written")]
    assert [line.split(",")[0] for line in lines] == ["step 1", "step 2", "step 3"]
    assert all(re.search(r"loss \d+\.\d{3} \(mean of the last [1-3] logged\)", line) for line in lines)
    # a run shorter than one checkpoint period still ends with a line, after the weights are written
    train(card, crops, tmp_path / "short", minutes=10, batch_size=2, lr=0.01, workers=0, max_steps=2, log_every=1)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("step 2,") and last.endswith("done: weights and checkpoint written")
