"""Tissue detection on synthetic thumbnails: coloured and pale H&E, greyscale brightfield,
one-channel fluorescence and featureless images (``pipeline.tissue``)."""

import numpy as np
import pytest
from scipy import ndimage

from pipeline.tissue import tissue_mask, tissue_mask_at_scale

SIZE = 200
MARGIN = 2


ELLIPSES = [(50, 50, 30, 22), (60, 145, 20, 35), (145, 60, 25, 25), (150, 150, 35, 28)]


def blobs(ellipses=ELLIPSES) -> np.ndarray:
    """Boolean mask of ellipses (row, column, half-height, half-width) of tissue on a SIZE² thumbnail."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    mask = np.zeros((SIZE, SIZE), bool)
    for r, c, a, b in ellipses:
        mask |= ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1
    return mask


def nuclei(tissue: np.ndarray, seed: int, radius: int = 3, count: int = 60) -> np.ndarray:
    """Small discs inside ``tissue``."""
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(tissue)
    picks = rng.choice(len(rows), count, replace=False)
    centres = np.zeros(tissue.shape, bool)
    centres[rows[picks], cols[picks]] = True
    disc = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(centres, disc, iterations=radius) & tissue


def brightfield(glass, cytoplasm, nucleus, noise: float, seed: int = 0, tissue=None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 thumbnail, tissue mask): stained blobs with nuclei on glass, with pixel noise."""
    rng = np.random.default_rng(seed)
    tissue = blobs() if tissue is None else tissue
    image = np.empty((SIZE, SIZE, 3), np.float64)
    image[:] = glass
    image[tissue] = cytoplasm
    image[nuclei(tissue, seed)] = nucleus
    image += rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), tissue


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """What a scanner in grey mode gives: luminance, replicated to three channels."""
    grey = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def he(tissue=None) -> tuple[np.ndarray, np.ndarray]:
    return brightfield((238, 238, 240), (215, 140, 190), (110, 60, 150), noise=4, tissue=tissue)


def pale_he() -> tuple[np.ndarray, np.ndarray]:
    """Faint staining on noisy glass: the glass's saturation overlaps the tissue's pixel by pixel."""
    return brightfield((240, 240, 240), (232, 216, 228), (215, 195, 225), noise=5)


def fading_he() -> tuple[np.ndarray, np.ndarray]:
    """Staining that fades from pale (left) to barely there (right) on clean glass: half of the
    tissue has a saturation under 0.05."""
    rng = np.random.default_rng(2)
    tissue = blobs()
    strength = np.linspace(1.0, 0.3, SIZE)[None, :, None]
    image = np.broadcast_to(240 - strength * (240 - np.array([225.0, 205, 222])), (SIZE, SIZE, 3)).copy()
    image[~tissue] = 240
    image += rng.normal(0, 1, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), tissue


def stroma_and_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """Tissue filling the image but for a lumen: pale stroma between dense nuclei. Otsu's first
    split on saturation falls between the two stains, and the stroma was taken for glass."""
    tissue = ~blobs([(100, 100, 40, 50)])
    image, _ = brightfield((240, 238, 240), (228, 200, 218), (110, 60, 150), noise=4, tissue=tissue)
    dense = nuclei(tissue, seed=5, radius=4, count=900)
    image[dense] = np.array([110, 60, 150], np.uint8)
    return image, tissue


def fluorescence(brightest: float = 220, background: float = 12) -> tuple[np.ndarray, np.ndarray]:
    """Bright nuclei of varying brightness on a dark, slightly noisy background, one channel as grey RGB."""
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    signal = np.zeros((SIZE, SIZE), bool)
    image = np.full((SIZE, SIZE), float(background))
    for r in range(20, SIZE, 40):
        for c in range(20, SIZE, 40):
            disc = (rows - r - rng.integers(-5, 6)) ** 2 + (cols - c - rng.integers(-5, 6)) ** 2 <= rng.integers(6, 11) ** 2
            signal |= disc
            image[disc] = rng.uniform(0.4, 1) * brightest
    image += rng.normal(0, 3, image.shape)
    grey = np.clip(image, 0, 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), signal


def greyed(case):
    def make():
        rgb, tissue = case()
        return to_grey(rgb), tissue

    return make


def check(mask: np.ndarray, tissue: np.ndarray, margin: int = MARGIN) -> None:
    covered = mask[tissue].mean()
    beyond = ~ndimage.binary_dilation(tissue, iterations=margin + 1)
    spill = mask[beyond].mean()
    assert covered >= 0.9, f"only {covered:.0%} of the tissue pixels are in the mask"
    assert spill <= 0.1, f"{spill:.0%} of the background beyond the margin is in the mask"


CASES = {
    "he": he,
    "pale_he": pale_he,
    "grey_he": greyed(he),
    "grey_pale_he": greyed(pale_he),
    "fading_he": fading_he,
    "stroma_and_nuclei": stroma_and_nuclei,
    "colour_cast": lambda: brightfield((195, 208, 250), (185, 115, 205), (90, 45, 160), noise=4),  # blue-tinted glass
    "fluorescence": fluorescence,
    "dim_fluorescence": lambda: fluorescence(brightest=50, background=6),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("margin", [0, MARGIN])
def test_tissue_is_found_and_background_left_out(name, margin):
    thumbnail, tissue = CASES[name]()
    mask = tissue_mask(thumbnail, margin=margin)
    assert mask.shape == tissue.shape and mask.dtype == bool
    check(mask, tissue, margin)


def test_a_grey_slide_mostly_covered_by_tissue_is_still_brightfield():
    """The background is told by the most common grey level, relative to mid-grey: tissue that
    outnumbers the glass is not taken for the background."""
    thumbnail, tissue = greyed(lambda: he(blobs([(100, 100, 95, 95)])))()
    assert tissue.mean() > 0.65
    check(tissue_mask(thumbnail), tissue)


def test_coloured_slides_keep_the_saturation_threshold():
    """Coloured tissue is found by its colour, not its darkness: a grey smudge (dust, a fold's
    shadow) as dark as the tissue is left out on an H&E slide."""
    thumbnail, tissue = he()
    thumbnail[5:25, 170:195] = 150
    check(tissue_mask(thumbnail), tissue)


def test_a_thumbnail_finer_than_tissue_scale_is_judged_on_block_means():
    """A small image is its own thumbnail: at 0.25 µm a nucleus is 30 px across and loose stroma
    is pale fibres around gaps of glass; judged pixel by pixel the gaps were not tissue (tissue
    area, counts per mm²). The lumen is glass at any scale."""
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[:800, :800]
    lumen = (rows - 400) ** 2 + (cols - 400) ** 2 <= 150**2
    image = np.full((800, 800, 3), (230, 200, 222), np.float64)  # pale fibres: saturation ~0.13
    image[ndimage.binary_dilation(rng.random((800, 800)) < 0.004, iterations=7)] = (242, 242, 242)  # a third gaps
    for r, c in rng.integers(0, 800, (150, 2)):
        image[(rows - r) ** 2 + (cols - c) ** 2 <= 15**2] = (110, 60, 150)
    image[lumen] = (242, 242, 242)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).round().astype(np.uint8)
    valid = np.ones(lumen.shape, bool)
    valid[:, :40] = False
    image[~valid] = 0
    mask = tissue_mask_at_scale(image, valid, pixel_um=0.25)
    assert mask.shape == lumen.shape and not mask[~valid].any()
    tissue = ~lumen & valid
    assert mask[tissue].mean() >= 0.95 and mask[ndimage.binary_erosion(lumen, iterations=40)].mean() <= 0.05
    assert tissue_mask(image, valid)[tissue].mean() < 0.9  # pixel by pixel
    assert (tissue_mask_at_scale(image, valid, pixel_um=8.0) == tissue_mask(image, valid)).all()  # coarse already


def test_invalid_pixels_are_ignored():
    thumbnail, tissue = to_grey(he()[0]), blobs()
    valid = np.ones(tissue.shape, bool)
    valid[:, :20] = False
    thumbnail[~valid] = 0  # what a slide's read gives outside its scanned area
    mask = tissue_mask(thumbnail, valid)
    assert not mask[:, :20].any()
    check(mask, tissue)
    assert not tissue_mask(thumbnail, np.zeros(tissue.shape, bool)).any()


@pytest.mark.parametrize("value", [0, 1, 128, 242, 255, (230, 150, 200)])
def test_uniform_thumbnails_have_no_tissue(value):
    thumbnail = np.zeros((SIZE, SIZE, 3), np.uint8)
    thumbnail[:] = value
    assert not tissue_mask(thumbnail).any()
    assert not tissue_mask(thumbnail, margin=0).any()


@pytest.mark.parametrize("level", [242, 8])
def test_blank_noisy_slides_have_little_tissue(level):
    """Empty glass (brightfield) or an empty dark field: sensor noise alone is not tissue."""
    rng = np.random.default_rng(3)
    grey = np.clip(rng.normal(level, 2, (SIZE, SIZE)), 0, 255).round().astype(np.uint8)
    assert tissue_mask(np.repeat(grey[..., None], 3, axis=2)).mean() <= 0.01
