"""Canonical digits: the ten digits rendered from computer fonts, MNIST-like.

Fonts come from matplotlib's bundled folder first, then the system's (matplotlib's font finder),
then any ``--fonts-dir`` folder (searched recursively); ``.ttf`` and ``.otf`` files, one per full
font name (the first found wins, so a system copy of a bundled font is not counted twice).

A font is usable when it maps all ten digit code points, no digit glyph carries the standard
(Adobe Glyph List) name of another character (symbol fonts such as cmsy10 put "infinity" at "1";
Adobe's old-style digit names count as digits), and the ten glyphs render as ten distinct,
non-empty images (fonts that draw one placeholder box for every digit fail here).

Images are MNIST-like: white on black, the glyph scaled so its longer side fills a 20x20 box and
placed in 28x28 with its centre of mass at the centre (as MNIST was made). The augmentation of
Section 3.2 (rotation and scaling) uses 7 rotations x 3 scales = 21 variants per digit and font:
the paper's 71,400 images from 340 fonts are exactly 21 per digit per font.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from fontTools.agl import toUnicode
from fontTools.ttLib import TTFont, TTLibError
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from defenses.sanitization.errors import SanitizationError
from mlcore.datasets import ImageDataset

logger = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf")
ROTATIONS = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0)  # degrees
SCALES = (0.8, 0.9, 1.0)  # of the 20x20 box
RENDER_SIZE = 96  # points: glyphs are drawn large, then reduced (antialiased) to the box
BOX, FRAME = 20, 28
MIN_DIFFERENCE = 0.02  # mean absolute difference (of 1) below which two digit images are "the same"
OLD_STYLE_DIGITS = {chr(0xF730 + d): str(d) for d in range(10)}  # Adobe's 'zerooldstyle', ...


def bundled_fonts() -> list[Path]:
    """The fonts matplotlib ships."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FONT_SUFFIXES)


def system_fonts() -> list[Path]:
    """The machine's fonts, as matplotlib's font finder lists them."""
    from matplotlib import font_manager

    found = font_manager.findSystemFonts(fontext="ttf")
    return sorted(Path(p) for p in found if Path(p).suffix.lower() in FONT_SUFFIXES)


def folder_fonts(folder: Path) -> list[Path]:
    """The ``.ttf`` and ``.otf`` files under ``folder`` (recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SanitizationError(f"fonts folder {folder} is not a directory")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class DigitFont:
    """A usable font: its file, full name and the ten un-augmented glyphs (white on black)."""

    path: Path
    name: str
    glyphs: tuple[Image.Image, ...]


def find_fonts(fonts_dirs: Iterable[Path] = (), *, system: bool = True) -> list[DigitFont]:
    """Every usable digit font: bundled, then system (when ``system``), then each folder.
    A folder without a single usable font is an error (it was named for a reason)."""
    candidates = bundled_fonts() + (system_fonts() if system else [])
    chosen: dict[str, DigitFont] = {}
    for path in candidates:
        font = load_digit_font(path)
        if font is not None:
            chosen.setdefault(font.name, font)
    for folder in fonts_dirs:
        usable = [f for f in (load_digit_font(p) for p in folder_fonts(folder)) if f is not None]
        if not usable:
            raise SanitizationError(
                f"fonts folder {folder} has no usable digit font (.ttf/.otf with ten distinct digits)"
            )
        for font in usable:
            chosen.setdefault(font.name, font)
    if not chosen:
        raise SanitizationError("no usable digit font found")
    logger.info("%d usable digit fonts", len(chosen))
    return list(chosen.values())


@functools.lru_cache(maxsize=1024)
def load_digit_font(path: Path) -> DigitFont | None:
    """The font at ``path`` with its ten digit glyphs, or None when it is not a usable digit font."""
    try:
        with TTFont(path, lazy=True, fontNumber=0) as info:
            cmap = info.getBestCmap() or {}
            name = info["name"].getBestFullName() or path.stem
        names = [cmap.get(ord(str(d))) for d in range(10)]
        if any(n is None for n in names):
            return None
        for digit, glyph_name in enumerate(names):
            decoded = toUnicode(glyph_name)
            if decoded and OLD_STYLE_DIGITS.get(decoded, decoded) != str(digit):
                return None
        font = ImageFont.truetype(str(path), RENDER_SIZE)
        glyphs = tuple(_draw(font, str(d)) for d in range(10))
    except (OSError, TTLibError, KeyError, ValueError) as exc:
        logger.debug("skipping font %s: %s", path, exc)
        return None
    if any(g is None for g in glyphs):
        return None
    usable = tuple(g for g in glyphs if g is not None)
    if not _distinct([frame(g, rotation=0.0, scale=1.0) for g in usable]):
        return None
    return DigitFont(path, name, usable)


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """White glyph on black, cropped to its ink; None when the glyph draws nothing."""
    canvas = Image.new("L", (3 * RENDER_SIZE, 3 * RENDER_SIZE), 0)
    ImageDraw.Draw(canvas).text((RENDER_SIZE, RENDER_SIZE), text, fill=255, font=font)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def _distinct(images: list[np.ndarray]) -> bool:
    flat = np.stack([i.reshape(-1) / 255.0 for i in images])
    difference = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)
    return bool(np.all(difference[~np.eye(len(images), dtype=bool)] > MIN_DIFFERENCE))


def frame(glyph: Image.Image, *, rotation: float, scale: float) -> np.ndarray:
    """Rotate the glyph, fit its longer side to ``scale`` x 20 pixels, centre its mass in 28x28."""
    turned = glyph.rotate(rotation, resample=Image.Resampling.BILINEAR, expand=True)
    box = turned.getbbox()
    if box is not None:
        turned = turned.crop(box)
    width, height = turned.size
    factor = BOX * scale / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = np.asarray(turned.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
    centre_y, centre_x = ndimage.center_of_mass(small) if small.any() else (0.0, 0.0)
    top = min(max(round(FRAME / 2 - centre_y), 0), FRAME - size[1])
    left = min(max(round(FRAME / 2 - centre_x), 0), FRAME - size[0])
    canvas = np.zeros((FRAME, FRAME))
    canvas[top : top + size[1], left : left + size[0]] = small
    return canvas.clip(0, 255).round().astype(np.uint8)


def render_digits(
    fonts: list[DigitFont],
    *,
    rotations: tuple[float, ...] = ROTATIONS,
    scales: tuple[float, ...] = SCALES,
) -> tuple[ImageDataset, np.ndarray]:
    """Every font x digit x rotation x scale as an MNIST-like image set, and each image's font
    index (to split or report by font)."""
    images, labels, font_of = [], [], []
    for index, font in enumerate(fonts):
        for digit, glyph in enumerate(font.glyphs):
            for rotation in rotations:
                for scale in scales:
                    images.append(frame(glyph, rotation=rotation, scale=scale))
                    labels.append(digit)
                    font_of.append(index)
    dataset = ImageDataset(
        "canonical-fonts",
        torch.from_numpy(np.stack(images)[:, None]),
        torch.tensor(labels, dtype=torch.int64),
        10,
    )
    return dataset, np.asarray(font_of)
