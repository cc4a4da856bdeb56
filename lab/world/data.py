"""Images of the world: procedural captioned pretraining images and the fine-tuning images from a folder.

Pretraining image: a background of one named colour, shaded towards a second, carrying a named texture (plain,
stripes, checks, dots, grain, clouds or waves, from 2-pixel detail to broad bands), one captioned shape at a named
place, and up to two uncaptioned blobs; colours, sizes, periods and angles are jittered so the distribution is broad
and holds both layout and fine detail. Caption: "<colour> <shape> <position> on <colour> <texture>", for example
"red circle left on blue stripes". A tenth of the captions are dropped to the empty caption, as in classifier-free
guidance training. Every image is a float32 array (3, 32, 32) in [-1, 1]; the same seed gives the same images.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from .text import COLOURS, POSITIONS, SHAPES, TEXTURES

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
# Where a shape's centre is drawn for each position word: (x range, y range) in [0, 1] image coordinates.
_PLACES = {"left": ((0.2, 0.35), (0.3, 0.7)), "right": ((0.65, 0.8), (0.3, 0.7)), "top": ((0.3, 0.7), (0.2, 0.35)),
           "bottom": ((0.3, 0.7), (0.65, 0.8)), "centre": ((0.4, 0.6), (0.4, 0.6))}
_FREQUENCY = np.sqrt(np.fft.fftfreq(RESOLUTION)[:, None] ** 2 + np.fft.fftfreq(RESOLUTION)[None] ** 2)


def _jittered(rng: np.random.Generator, index: int) -> np.ndarray:
    return np.clip(_PALETTE[index] + rng.normal(0, 0.06, 3), 0, 1).astype(np.float32)


def _rotated(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (in pixels) along and across a random direction."""
    angle = rng.uniform(0, np.pi)
    x, y = _X * RESOLUTION, _Y * RESOLUTION
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _texture(rng: np.random.Generator, texture: str) -> np.ndarray:
    """A pattern (32, 32) in [0, 1] for the texture word, at a random scale: 0 keeps the background, 1 is the ink."""
    if texture == "plain":
        return np.zeros((RESOLUTION, RESOLUTION), np.float32)
    if texture == "stripes":
        u, _ = _rotated(rng)
        return ((u / rng.uniform(2.0, 8.0) + rng.uniform()) % 1.0 < 0.5).astype(np.float32)
    if texture == "checks":
        cell = rng.integers(2, 7)
        shift = rng.integers(0, cell, 2)
        rows, columns = np.indices((RESOLUTION, RESOLUTION))
        return (((rows + shift[0]) // cell + (columns + shift[1]) // cell) % 2).astype(np.float32)
    if texture == "dots":
        period = rng.uniform(4.0, 8.0)
        u, v = _rotated(rng)
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return (du ** 2 + dv ** 2 < rng.uniform(0.04, 0.1)).astype(np.float32)
    if texture == "grain":
        return rng.uniform(0, 1, (RESOLUTION, RESOLUTION)).astype(np.float32)
    if texture == "clouds":  # 1/f^beta noise, the spectrum of natural images
        spectrum = (rng.normal(size=(RESOLUTION, RESOLUTION)) + 1j * rng.normal(size=(RESOLUTION, RESOLUTION)))
        spectrum /= np.maximum(_FREQUENCY, 1.0 / RESOLUTION) ** rng.uniform(1.0, 2.0)
        field = np.real(np.fft.ifft2(spectrum))
        return ((field - field.min()) / (np.ptp(field) + 1e-8)).astype(np.float32)
    # waves: a sinusoid along a random direction, bent by a slower one across it
    u, v = _rotated(rng)
    bend = rng.uniform(0, 3) * np.sin(2 * np.pi * v / rng.uniform(8, 32))
    return (0.5 + 0.5 * np.sin(2 * np.pi * (u + bend) / rng.uniform(3.0, 10.0))).astype(np.float32)


def _shape_mask(rng: np.random.Generator, shape: str, position: str) -> np.ndarray:
    (x0, x1), (y0, y1) = _PLACES[position]
    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    size = rng.uniform(0.12, 0.26)
    dx, dy = _X - cx, _Y - cy
    if shape == "circle":
        return (dx ** 2 + dy ** 2 < size ** 2).astype(np.float32)
    if shape == "ring":
        r = np.sqrt(dx ** 2 + dy ** 2)
        return ((r < size) & (r > size * rng.uniform(0.5, 0.7))).astype(np.float32)
    if shape in ("square", "diamond"):
        angle = rng.uniform(-0.3, 0.3) + (np.pi / 4 if shape == "diamond" else 0.0)
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        return ((np.abs(u) < size * 0.85) & (np.abs(v) < size * 0.85)).astype(np.float32)
    if shape == "cross":
        arm = size * 0.3
        return (((np.abs(dx) < arm) & (np.abs(dy) < size)) | ((np.abs(dy) < arm) & (np.abs(dx) < size))).astype(np.float32)
    v = dy / size  # triangle: -1 top .. 1 bottom, apex at the top
    return ((v > -1) & (v < 1) & (np.abs(dx) < size * (v + 1) / 2)).astype(np.float32)


def procedural_image(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One pretraining image (3, 32, 32) in [-1, 1] and its full caption (never empty)."""
    background, second, ink, colour = rng.choice(len(_COLOUR_NAMES), 4, replace=True)
    while colour == background:
        colour = rng.integers(len(_COLOUR_NAMES))
    u, _ = _rotated(rng)
    ramp = np.clip(u / RESOLUTION * rng.uniform(0.5, 1.5), 0, 1)
    mix = rng.uniform(0.0, 0.5)  # how far the shading goes towards the second colour
    image = (_jittered(rng, background)[:, None, None] * (1 - mix * ramp)
             + _jittered(rng, second)[:, None, None] * (mix * ramp))
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    strength = rng.uniform(0.3, 0.9) * _texture(rng, texture)
    image = image * (1 - strength) + _jittered(rng, ink)[:, None, None] * strength
    shape, position = SHAPES[rng.integers(len(SHAPES))], POSITIONS[rng.integers(len(POSITIONS))]
    mask = _shape_mask(rng, shape, position)
    fill = _jittered(rng, colour)[:, None, None] * (1 - rng.uniform(0, 0.4) * ramp)  # a little shading
    image = image * (1 - mask) + fill * mask
    for _ in range(rng.integers(0, 3)):  # uncaptioned clutter
        cx, cy, rx, ry = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.12), rng.uniform(0.04, 0.12)
        blob = (((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 < 1).astype(np.float32)
        image = image * (1 - blob) + rng.uniform(0, 1, 3).astype(np.float32)[:, None, None] * blob
    image = image + rng.normal(0, 0.01, image.shape)
    caption = f"{_COLOUR_NAMES[colour]} {shape} {position} on {_COLOUR_NAMES[background]} {texture}"
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
