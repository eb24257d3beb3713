"""Canonical sanitisation: the usable fonts are the digit fonts (symbol and placeholder fonts are
dropped), the rendered digits are MNIST-like and augmented, the canonical pair keeps exactly the
images the canonical model is confident about, and bad fonts folders or data are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from defenses.sanitization import SanitizationError, build_sanitized_pair
from defenses.sanitization.canonical import (
    CanonicalModel,
    check_digit_dataset,
    train_canonical_model,
)
from defenses.sanitization.fonts import (
    ROTATIONS,
    SCALES,
    bundled_fonts,
    find_fonts,
    render_digits,
)
from mlcore.datasets import ImageDataset, load_dataset
from mlcore.training import predict_logits

CANONICAL_THRESHOLD = 0.7


def bundled(name: str) -> Path:
    return next(p for p in bundled_fonts() if p.name == name)


def test_the_bundled_digit_fonts_are_kept_and_symbol_or_placeholder_fonts_dropped():
    names = {font.path.name for font in find_fonts(system=False)}
    assert {"DejaVuSans.ttf", "cmr10.ttf", "STIXGeneral.ttf", "cmmi10.ttf"} <= names
    # cmsy10/cmex10 put symbols at the digit code points, LastResort one box for all digits,
    # the STIX size variants and DejaVu*Display have no digits at all
    dropped = {
        "cmsy10.ttf",
        "cmex10.ttf",
        "LastResortHE-Regular.ttf",
        "STIXSizOneSymReg.ttf",
        "DejaVuSansDisplay.ttf",
    }
    assert not names & dropped


def test_rendered_digits_are_mnist_like_and_augmented():
    fonts = find_fonts(system=False)[:2]
    digits, font_of = render_digits(fonts)
    variants = len(ROTATIONS) * len(SCALES)
    assert digits.images.shape == (2 * 10 * variants, 1, 28, 28)
    assert digits.images.dtype == torch.uint8
    assert np.bincount(digits.labels.numpy()).tolist() == [2 * variants] * 10
    assert np.bincount(font_of).tolist() == [10 * variants] * 2
    for image in digits.images[:, 0].numpy():
        rows, cols = np.nonzero(image)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 20  # fitted into the 20x20 box
        assert np.allclose(ndimage.center_of_mass(image.astype(float)), 14, atol=1.0)
        assert image.max() > 200 and image[0].max() == 0  # white on black
    # the augmentation really changes the image: all variants of one glyph differ
    first = digits.images[:variants].reshape(variants, -1)
    assert len(torch.unique(first, dim=0)) == variants


def test_a_fonts_folder_without_a_usable_font_is_named(tmp_path):
    shutil.copy(bundled("cmsy10.ttf"), tmp_path / "symbols.ttf")
    (tmp_path / "broken.otf").write_bytes(b"not a font")
    with pytest.raises(
        SanitizationError, match=f"fonts folder {tmp_path} has no usable digit font"
    ):
        find_fonts([tmp_path], system=False)
    with pytest.raises(SanitizationError, match="is not a directory"):
        find_fonts([tmp_path / "missing"], system=False)


def test_a_fonts_folder_adds_its_fonts_once(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(bundled("DejaVuSans.ttf"), nested / "copy-of-dejavu.ttf")
    assert len(find_fonts([tmp_path], system=False)) == len(find_fonts(system=False))


def test_canonical_sanitisation_needs_digit_data():
    colour = ImageDataset(
        "cifar-like", torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4), 10
    )
    with pytest.raises(SanitizationError, match="cifar-like has 3x32x32 images and 10 classes"):
        check_digit_dataset(colour)


@pytest.fixture(scope="module")
def canonical() -> CanonicalModel:
    return train_canonical_model(
        arch="lenet5",
        arch_kwargs={"in_channels": 1, "num_classes": 10},
        test=load_dataset("mnist-embedded:test"),
        system_fonts=False,
        epochs=2,
    )


def test_the_canonical_model_learns_fonts_and_beats_chance_on_real_digits(canonical):
    report = canonical.report
    assert report["font_count"] == len(find_fonts(system=False))
    assert report["train_images"] == int(0.8 * report["images"])
    assert report["held_out_accuracy"] > 0.9
    assert report["test_accuracy"] > 0.3  # chance is 0.1; about 0.5 with the bundled fonts


def test_canonical_pair_keeps_exactly_the_confident_images(canonical, parent_path, tmp_path):
    out = tmp_path / "canonical.pt"
    pair = build_sanitized_pair(
        parent_path,
        method="canonical",
        threshold=CANONICAL_THRESHOLD,
        canonical=canonical,
        epochs=1,
        out_path=out,
    )
    train = load_dataset(pair.provenance["train_data"])
    logits = predict_logits(canonical.model, train.images).double()
    confidence = torch.softmax(logits, dim=1)[torch.arange(len(train)), train.labels].numpy()
    expected = np.flatnonzero(confidence >= CANONICAL_THRESHOLD)
    assert pair.provenance["kept_indices"] == expected.tolist()
    assert 0 < len(expected) < len(train)
    assert pair.provenance["method"] == "canonical"
    assert pair.provenance["canonical"]["test_accuracy"] == canonical.report["test_accuracy"]
    assert out.exists()


def test_a_bad_fonts_folder_stops_canonical_sanitisation_before_anything_is_written(
    parent_path, tmp_path
):
    empty = tmp_path / "fonts"
    empty.mkdir()
    out = tmp_path / "canonical.pt"
    with pytest.raises(SanitizationError, match="has no usable digit font"):
        build_sanitized_pair(
            parent_path,
            method="canonical",
            threshold=0.9,
            fonts_dirs=[empty],
            system_fonts=False,
            out_path=out,
        )
    assert not out.exists()
