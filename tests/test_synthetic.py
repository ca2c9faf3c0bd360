import numpy as np
import rasterio

from models.synthetic import make_scene
from pipeline.synthetic_raster import write_tiled_scene


def test_margin_keeps_objects_off_the_edges_and_zero_margin_is_the_old_scene():
    scene = make_scene(4, 300, 300, margin=2)
    assert scene.count > 0
    assert not scene.labels[:2].any() and not scene.labels[-2:].any()
    assert not scene.labels[:, :2].any() and not scene.labels[:, -2:].any()
    plain, zero = make_scene(4, 300, 300), make_scene(4, 300, 300, margin=0)
    assert (plain.image == zero.image).all() and (plain.labels == zero.labels).all()


def test_tiled_scene_repeats_its_block_and_counts_only_whole_objects(tmp_path):
    block, side = 300, 700
    count = write_tiled_scene(tmp_path / "big.tif", seed=4, side=side, block=block)
    scene = make_scene(4, block, block, margin=2)
    with rasterio.open(tmp_path / "big.tif") as dataset:
        assert (dataset.width, dataset.height, dataset.count) == (side, side, 3)
        assert dataset.crs is not None and dataset.block_shapes[0] == (256, 256)
        image = dataset.read().transpose(1, 2, 0)
    # the mosaic's labels, each copy with its own ids; an object is whole when none of its pixels was cut off
    sizes = np.bincount(scene.labels.ravel())
    whole = 0
    for row in range(0, side, block):
        for col in range(0, side, block):
            h, w = min(block, side - row), min(block, side - col)
            assert (image[row : row + h, col : col + w] == scene.image[:h, :w]).all()
            kept = np.bincount(scene.labels[:h, :w].ravel(), minlength=len(sizes))
            whole += int(np.count_nonzero((kept[1:] == sizes[1:]) & (sizes[1:] > 0)))
    assert count == whole
    assert 4 * scene.count < count < 9 * scene.count
