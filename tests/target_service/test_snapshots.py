"""Detector snapshot files: they round-trip a detector's state exactly, are compressed, and
never unpickle anything."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from defenses.mi_redundancy import MiRedundancyDetector, calibrate_mi_reference
from defenses.prada import PradaDetector
from mlcore.datasets import load_dataset
from target_service.snapshots import read_snapshot, write_snapshot


def assert_same_tree(a: object, b: object) -> None:
    assert type(a) is type(b) or (isinstance(a, tuple) and isinstance(b, list))
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def array_bytes(tree: object) -> int:
    """Bytes of every tensor and array in a tree, uncompressed."""
    if isinstance(tree, dict):
        return sum(array_bytes(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(array_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    return tree.nbytes if isinstance(tree, np.ndarray) else 0


def test_detector_states_round_trip_and_are_compressed(tmp_path: Path) -> None:
    test = load_dataset("mnist-embedded:test")
    x, y = test.images[:300], test.labels[:300]
    reference = calibrate_mi_reference(
        load_dataset("mnist-embedded:target-train").images, n_windows=4, false_alarm_rate=0.5
    )
    prada, mi = PradaDetector(), MiRedundancyDetector(reference=reference)
    for detector in (prada, mi):
        detector.observe(x[:205], y[:205])  # mid-stream, between two tests
    payload = {
        "through_entry": 17,
        "detectors": {"prada": prada.state_dict(), "mi_redundancy": mi.state_dict()},
        "extra": {"array": np.arange(5, dtype=np.int16), "nan": float("nan"), "none": None},
    }
    path = tmp_path / "snapshot.npz"
    write_snapshot(path, payload)
    loaded = read_snapshot(path)
    assert np.isnan(loaded["extra"].pop("nan")) and np.isnan(payload["extra"].pop("nan"))
    assert_same_tree(payload, loaded)

    images = sum(t.numel() * t.element_size() for t in prada.state_dict()["growing_sets"])
    assert images > 100_000  # PRADA's uint8 images
    assert path.stat().st_size < 0.5 * array_bytes(payload)  # MNIST digits compress well
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}

    # the restored detectors go on exactly as the originals
    restored = PradaDetector(), MiRedundancyDetector(reference=reference)
    restored[0].load_state_dict(loaded["detectors"]["prada"])
    restored[1].load_state_dict(loaded["detectors"]["mi_redundancy"])
    for original, copy in zip((prada, mi), restored, strict=True):
        assert copy.observe(x[205:], y[205:]) == original.observe(x[205:], y[205:])
    assert restored[0].growing_set_sizes == prada.growing_set_sizes
    assert all(restored[0].class_state(c) == prada.class_state(c) for c in prada.growing_set_sizes)


def test_a_snapshot_holding_a_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, tree=np.array('{"x": {"__ndarray__": "a0"}}'), a0=np.array([object()]))
    with pytest.raises(ValueError, match="allow_pickle"):
        read_snapshot(path)


def test_unsupported_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot hold a set"):
        write_snapshot(tmp_path / "s.npz", {"x": {1, 2}})
    with pytest.raises(TypeError, match="keys must be strings"):
        write_snapshot(tmp_path / "s.npz", {"x": {1: 2}})
