"""Tensor <-> JSON encoding: round trips through base64 and nested lists, and every way a
payload can fail to decode, each with a message that names the problem."""

from __future__ import annotations

import base64
import json
from typing import Any, NamedTuple

import numpy as np
import pytest
from pydantic import ValidationError

from mlcore.wire import (
    EncodedTensor,
    PredictRequest,
    TensorTooLarge,
    WireError,
    decode_tensor,
    echo,
    encode_tensor,
)

RNG = np.random.default_rng(7)
UINT8 = RNG.integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
FLOAT32 = RNG.random(size=(2, 3, 4, 5), dtype=np.float32)


@pytest.mark.parametrize("array", [UINT8, FLOAT32], ids=["uint8", "float32"])
def test_base64_round_trip_is_exact(array: np.ndarray) -> None:
    encoded = encode_tensor(array)
    assert encoded.dtype == str(array.dtype)
    assert encoded.shape == list(array.shape)
    assert isinstance(encoded.data, str)
    decoded = decode_tensor(encoded)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("array", [UINT8, FLOAT32], ids=["uint8", "float32"])
def test_round_trip_through_json_text(array: np.ndarray) -> None:
    text = PredictRequest(inputs=encode_tensor(array), request_id="r-1").model_dump_json()
    request = PredictRequest.model_validate_json(text)
    assert request.request_id == "r-1"
    np.testing.assert_array_equal(decode_tensor(request.inputs), array)


def test_float64_and_non_contiguous_arrays_are_encoded_by_value() -> None:
    as_float64 = FLOAT32.astype(np.float64)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(as_float64)), FLOAT32)
    transposed = UINT8.transpose(0, 1, 3, 2)
    assert not transposed.flags.c_contiguous
    np.testing.assert_array_equal(decode_tensor(encode_tensor(transposed)), transposed)


@pytest.mark.parametrize("with_shape", [True, False], ids=["with-shape", "without-shape"])
@pytest.mark.parametrize("array", [UINT8, FLOAT32], ids=["uint8", "float32"])
def test_nested_lists_round_trip(array: np.ndarray, with_shape: bool) -> None:
    payload = EncodedTensor(
        dtype=str(array.dtype),
        shape=list(array.shape) if with_shape else None,
        data=array.tolist(),
    )
    decoded = decode_tensor(EncodedTensor.model_validate_json(payload.model_dump_json()))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_huge_shape_without_a_limit_is_a_length_error() -> None:
    payload = EncodedTensor(dtype="float32", shape=[2**40, 2**40], data="")
    with pytest.raises(WireError, match=f"needs {2**80 * 4}"):
        decode_tensor(payload)


def test_max_elements_is_inclusive() -> None:
    encoded = encode_tensor(UINT8)
    assert decode_tensor(encoded, max_elements=UINT8.size).shape == UINT8.shape
    with pytest.raises(TensorTooLarge, match=f"more than {UINT8.size - 1}"):
        decode_tensor(encoded, max_elements=UINT8.size - 1)


def test_encode_refuses_other_dtypes() -> None:
    with pytest.raises(WireError, match="int16"):
        encode_tensor(np.zeros((1, 1, 2, 2), dtype=np.int16))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _floats(*values: float) -> dict[str, Any]:
    array = np.array(values, dtype="<f4").reshape(1, 1, 1, len(values))
    return {"dtype": "float32", "shape": list(array.shape), "data": _b64(array)}


class Bad(NamedTuple):
    id: str
    payload: dict[str, Any]
    error: type[WireError]
    mentions: str  # a regular expression the message must match


BAD = [
    Bad("negative-dimension", {"dtype": "uint8", "shape": [-1, 784], "data": ""}, WireError, r"negative .*\[-1, 784\]"),
    Bad("too-many-values", {"dtype": "uint8", "shape": [10, 1, 28, 28], "data": ""}, TensorTooLarge, r"\[10, 1, 28, 28\] has 7840 values, more than 2352"),
    Bad("shape-overflows-int64", {"dtype": "uint8", "shape": [2**32, 2**32, 1, 1], "data": ""}, TensorTooLarge, "18446744073709551616 values"),
    Bad("dimension-beyond-int64", {"dtype": "uint8", "shape": [2**64, 1, 1, 1], "data": ""}, TensorTooLarge, "more than 2352"),
    Bad("zero-size-huge-shape", {"dtype": "uint8", "shape": [0, 2**62, 4, 1], "data": ""}, WireError, r"\[0, 4611686018427387904, 4, 1\] is not a valid array shape"),
    Bad("not-base64", {"dtype": "uint8", "shape": [1, 1, 2, 2], "data": "ab$d"}, WireError, "not valid base64"),
    Bad("bad-padding", {"dtype": "uint8", "shape": [1, 1, 2, 2], "data": "AAAAA"}, WireError, "not valid base64"),
    Bad("too-few-bytes", {"dtype": "uint8", "shape": [2, 1, 2, 2], "data": _b64(np.zeros(4, np.uint8))}, WireError, r"4 bytes .*\[2, 1, 2, 2\].* needs 8"),
    Bad("too-many-bytes", {"dtype": "float32", "shape": [1, 1, 1, 1], "data": _b64(np.zeros(2, "<f4"))}, WireError, "8 bytes .* needs 4"),
    Bad("nan", _floats(0.5, float("nan")), WireError, "NaN"),
    Bad("inf", _floats(float("inf"), 0.5), WireError, "infinity"),
    Bad("minus-inf", _floats(-float("inf")), WireError, "infinity"),
    Bad("above-one", _floats(0.25, 1.0001), WireError, r"\[0, 1\], got values in \[0.25, 1.0001\]"),
    Bad("below-zero", _floats(-0.5, 0.5), WireError, r"\[0, 1\], got values in \[-0.5, 0.5\]"),
    Bad("ragged-lists", {"dtype": "uint8", "data": [[1, 2], [3]]}, WireError, "rectangular"),
    Bad("strings-in-lists", {"dtype": "float32", "data": [["a", "b"]]}, WireError, "only numbers"),
    Bad("numeric-string-in-lists", {"dtype": "uint8", "data": [[0, "255"]]}, WireError, "no strings or booleans"),
    Bad("boolean-in-lists", {"dtype": "uint8", "data": [[0, True]]}, WireError, "no strings or booleans"),
    Bad("boolean-in-float-lists", {"dtype": "float32", "data": [[[0.5, False]]]}, WireError, "no strings or booleans"),
    Bad("null-in-lists", {"dtype": "uint8", "data": [[0, None]]}, WireError, "only numbers"),
    Bad("lists-disagree-with-shape", {"dtype": "uint8", "shape": [1, 2], "data": [[1, 2, 3]]}, WireError, r"\[1, 3\] but shape says \[1, 2\]"),
    Bad("uint8-fraction", {"dtype": "uint8", "data": [[1.5]]}, WireError, "whole numbers in 0..255"),
    Bad("uint8-above-255", {"dtype": "uint8", "data": [[256]]}, WireError, "whole numbers in 0..255"),
    Bad("uint8-negative", {"dtype": "uint8", "data": [[-1]]}, WireError, "whole numbers in 0..255"),
    Bad("uint8-nan-in-lists", {"dtype": "uint8", "data": [[float("nan")]]}, WireError, "NaN"),
    Bad("float-nan-in-lists", {"dtype": "float32", "data": [[float("nan"), 0.5]]}, WireError, "NaN"),
    Bad("float-out-of-range-in-lists", {"dtype": "float32", "data": [[2.0]]}, WireError, r"\[0, 1\]"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_decode_errors_name_the_problem(case: Bad) -> None:
    payload = EncodedTensor.model_validate(case.payload)
    with pytest.raises(case.error, match=case.mentions):
        decode_tensor(payload, max_elements=UINT8.size)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"dtype": "int16", "shape": [1], "data": ""}, "dtype"),
        ({"dtype": "uint8", "shape": [1], "data": "", "scale": 255}, "scale"),
        ({"dtype": "uint8", "shape": [1] * 9, "data": ""}, "shape"),
        ({"dtype": "uint8", "shape": [1]}, "data"),
    ],
    ids=["unknown-dtype", "extra-field", "too-many-dims", "missing-data"],
)
def test_schema_rejects_malformed_tensors(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EncodedTensor.model_validate(payload)
    assert field in {str(error["loc"][0]) for error in info.value.errors()}


STRICT = [
    ({"dtype": "uint8", "shape": ["1", 1, 28, 28], "data": ""}, ("shape", 0)),
    ({"dtype": "uint8", "shape": [True, 1, 28, 28], "data": ""}, ("shape", 0)),
    ({"dtype": "uint8", "shape": [1.0, 1, 28, 28], "data": ""}, ("shape", 0)),
    ({"dtype": "uint8", "shape": "1,1,28,28", "data": ""}, ("shape",)),
    ({"dtype": "uint8", "shape": [2**64 + 1, 1], "data": ""}, ("shape", 0)),
    ({"dtype": "uint8", "shape": [1, 1, 28, 28], "data": 7}, ("data",)),
    ({"dtype": "uint8", "shape": [1, 1, 28, 28], "data": b"\x00"}, ("data",)),
]


@pytest.mark.parametrize(("payload", "loc"), STRICT, ids=lambda v: repr(v)[:40])
def test_shape_and_data_types_are_strict(payload: dict[str, Any], loc: tuple) -> None:
    """``"1"``, ``true`` and ``1.0`` are not dimensions; nothing is coerced."""
    with pytest.raises(ValidationError) as info:
        EncodedTensor.model_validate(payload)
    assert loc in {tuple(error["loc"][: len(loc)]) for error in info.value.errors()}


def test_base64_without_shape_is_a_schema_error_and_the_schema_says_so() -> None:
    with pytest.raises(ValidationError, match="shape is required when data is base64"):
        EncodedTensor.model_validate({"dtype": "uint8", "data": _b64(UINT8)})
    schema = EncodedTensor.model_json_schema()
    assert schema["if"]["properties"]["data"] == {"type": "string"}
    assert schema["then"] == {"required": ["shape"]}
    # nested lists keep shape optional
    assert EncodedTensor.model_validate({"dtype": "uint8", "data": [[1]]}).shape is None


def test_echo_quotes_at_most_100_characters() -> None:
    assert echo("abc") == "'abc'"
    long = echo("x" * 5000)
    assert len(long) <= 100 + len(" (5002 characters)") and long.endswith("(5002 characters)")


@pytest.mark.parametrize("request_id", ["", "x" * 129], ids=["empty", "too-long"])
def test_request_id_length_is_bounded(request_id: str) -> None:
    inputs = encode_tensor(UINT8).model_dump()
    with pytest.raises(ValidationError, match="request_id"):
        PredictRequest.model_validate({"inputs": inputs, "request_id": request_id})
    assert PredictRequest.model_validate({"inputs": inputs, "request_id": "x" * 128})


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(TensorTooLarge, WireError) and issubclass(WireError, ValueError)
    assert json.loads(encode_tensor(UINT8).model_dump_json())["dtype"] == "uint8"
