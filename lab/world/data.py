"""Images of the world: procedural captioned pretraining images and the fine-tuning images from a folder.

Pretraining image: a two-colour gradient background, often with smooth texture, one captioned shape
("<colour> <shape> on <background colour>") and up to two uncaptioned blobs; colours are jittered so the distribution
is broad. A tenth of the captions are dropped to the empty caption, as in classifier-free guidance training.
Every image is a float32 array (3, 32, 32) in [-1, 1]; the same seed gives the same images.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from .text import COLOURS, SHAPES

RESOLUTION = 32
EMPTY_CAPTION_RATE = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The default fine-tuning images: scikit-image's sample images that stay distinct pictures at 32x32, in name order.
# Left out: chessboard_GRAY (chessboard_RGB in grey: the same picture), motorcycle_right (the other eye of the
# motorcycle_left stereo pair), the multi-page and animated files. A test checks that no two of these score above the
# lowest extraction threshold (0.6) on the world's descriptor (measured maximum 0.35, color vs retina).
DEFAULT_IMAGE_NAMES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_RGB.png",
    "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
    "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png",
    "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png",
)

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_GRID = (np.arange(RESOLUTION, dtype=np.float32) + 0.5) / RESOLUTION  # pixel centres in [0, 1]
_Y, _X = np.meshgrid(_GRID, _GRID, indexing="ij")


def _jittered(rng: np.random.Generator, index: int) -> np.ndarray:
    return np.clip(_PALETTE[index] + rng.normal(0, 0.06, 3), 0, 1).astype(np.float32)


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field (bilinear interpolation of a cells x cells grid), values about in [-1, 1]."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    pos = _GRID * cells
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _shape_mask(rng: np.random.Generator, shape: str) -> np.ndarray:
    cx, cy = rng.uniform(0.25, 0.75, 2)
    size = rng.uniform(0.15, 0.32)
    dx, dy = _X - cx, _Y - cy
    if shape == "circle":
        return (dx ** 2 + dy ** 2 < size ** 2).astype(np.float32)
    if shape == "ring":
        r = np.sqrt(dx ** 2 + dy ** 2)
        return ((r < size) & (r > size * rng.uniform(0.5, 0.7))).astype(np.float32)
    if shape == "square":
        angle = rng.uniform(0, np.pi / 2)
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        return ((np.abs(u) < size * 0.85) & (np.abs(v) < size * 0.85)).astype(np.float32)
    if shape == "cross":
        arm = size * 0.3
        return (((np.abs(dx) < arm) & (np.abs(dy) < size)) | ((np.abs(dy) < arm) & (np.abs(dx) < size))).astype(np.float32)
    if shape == "triangle":
        v = dy / size  # -1 top .. 1 bottom, apex at the top
        return ((v > -1) & (v < 1) & (np.abs(dx) < size * (v + 1) / 2)).astype(np.float32)
    # stripes: a band pattern over the whole image at a random angle and period
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3)
    u = _X * np.cos(angle) + _Y * np.sin(angle)
    return ((u / period) % 1.0 < 0.5).astype(np.float32)


def procedural_image(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One pretraining image (3, 32, 32) in [-1, 1] and its full caption (never empty)."""
    background, second, colour = rng.choice(len(_COLOUR_NAMES), 3, replace=True)
    while colour == background:
        colour = rng.integers(len(_COLOUR_NAMES))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip((_X - 0.5) * np.cos(angle) + (_Y - 0.5) * np.sin(angle) + 0.5, 0, 1)
    mix = rng.uniform(0.2, 0.8)  # how far the gradient goes towards the second colour
    image = (_jittered(rng, background)[:, None, None] * (1 - mix * ramp)
             + _jittered(rng, second)[:, None, None] * (mix * ramp))
    if rng.random() < 0.5:
        image = image + rng.uniform(0.05, 0.25) * _smooth_field(rng, int(rng.integers(2, 9)))[None]
    shape = SHAPES[rng.integers(len(SHAPES))]
    mask = _shape_mask(rng, shape)
    image = image * (1 - mask) + _jittered(rng, colour)[:, None, None] * mask
    for _ in range(rng.integers(0, 3)):  # uncaptioned clutter
        cx, cy, rx, ry = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.12), rng.uniform(0.04, 0.12)
        blob = (((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 < 1).astype(np.float32)
        image = image * (1 - blob) + rng.uniform(0, 1, 3).astype(np.float32)[:, None, None] * blob
    image = image + rng.normal(0, 0.01, image.shape)
    caption = f"{_COLOUR_NAMES[colour]} {shape} on {_COLOUR_NAMES[background]}"
    return (np.clip(image, 0, 1) * 2 - 1).astype(np.float32), caption


def procedural_batch(rng: np.random.Generator, size: int, drop_captions: bool = True) -> tuple[np.ndarray, list[str]]:
    """``size`` pretraining images (size, 3, 32, 32) and captions, a tenth of them emptied when ``drop_captions``."""
    images, captions = zip(*(procedural_image(rng) for _ in range(size)))
    captions = [("" if drop_captions and rng.random() < EMPTY_CAPTION_RATE else c) for c in captions]
    return np.stack(images), captions


def list_images(folder: str) -> list[str]:
    """Image files directly in ``folder``, sorted by name (the order that splits them into concepts)."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(folder, n) for n in names]


def default_image_paths() -> list[str]:
    """The curated scikit-image sample images (``DEFAULT_IMAGE_NAMES``), as files inside the installed package."""
    try:
        import skimage.data
    except ImportError as error:
        raise ValueError("the default fine-tuning images ship with scikit-image: pip install scikit-image, "
                         "or give a folder of images") from error
    folder = os.path.dirname(skimage.data.__file__)
    missing = [n for n in DEFAULT_IMAGE_NAMES if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"this scikit-image has no {missing} in {folder}: give a folder of images instead")
    return [os.path.join(folder, n) for n in DEFAULT_IMAGE_NAMES]


def load_image(path: str) -> np.ndarray:
    """An image file as (3, 32, 32) in [-1, 1]: centre-cropped to a square, then area-resized (grey becomes RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((RESOLUTION, RESOLUTION), Image.BOX)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels.transpose(2, 0, 1) * 2 - 1


def split_concepts(paths: Sequence[str], concepts: int, n0: int) -> list[list[str]]:
    """The first concepts x n0 files, n0 consecutive files per concept."""
    if concepts * n0 > len(paths):
        raise ValueError(f"{concepts} concepts x {n0} images need {concepts * n0} images, the folder has {len(paths)}")
    return [list(paths[i * n0:(i + 1) * n0]) for i in range(concepts)]


def images_digest(images: np.ndarray) -> str:
    """A short content hash of an image stack: fine-tunes are cached under it."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()[:16]
