"""The HTTP contract: pydantic schemas shared by the target service and the attacker's client.

Images travel as ``{"dtype": "uint8"|"float32", "shape": [n, C, H, W], "data": <base64, C order>}``
or with ``data`` as nested lists of JSON numbers (``shape`` then optional). uint8 values are
intensities 0..255; float32 values must be finite and in [0, 1]. Types are strict: ``"100"`` is
not a number and ``true`` is not 1. Response models are the contract: a label-only response has
no field that could carry scores, and unknown fields are forbidden.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from pydantic.json_schema import JsonDict

WIRE_DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


class WireError(ValueError):
    """An encoded tensor that does not decode to valid images; the message names the problem."""


class TensorTooLarge(WireError):
    """The tensor declares more values than the receiver accepts."""


ECHO_CHARS = 100
MAX_DIMENSION = 2**64  # bounds a shape's product (8 dims) so its size prints and compares fast


def echo(value: object, *, limit: int = ECHO_CHARS) -> str:
    """How an error message quotes something a client sent: its repr (a list as written),
    cut to ``limit`` characters, so a huge name or shape cannot flood an error body or a log."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


class _Strict(BaseModel):
    """Unknown fields are errors and nothing is coerced (no ``"100"`` -> 100, no ``true`` -> 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


_NESTED_NUMBERS: JsonDict = {
    "type": "array",
    "items": {"anyOf": [{"type": "number"}, {"type": "array"}]},
    "description": "Rectangular nested lists of JSON numbers, e.g. [n][C][H][W].",
}


class EncodedTensor(_Strict):
    """``data`` is base64 (then ``shape`` is required) or nested lists of numbers."""

    model_config = ConfigDict(
        # JSON Schema has no other way to say "shape is required when data is a string"
        json_schema_extra={
            "if": {"properties": {"data": {"type": "string"}}, "required": ["data"]},
            "then": {"required": ["shape"]},
        }
    )

    dtype: Literal["uint8", "float32"]
    shape: list[Annotated[StrictInt, Field(le=MAX_DIMENSION)]] | None = Field(
        default=None, max_length=8, description="Required when data is base64."
    )
    data: StrictStr | list[Any] = Field(
        description="Base64 of the C-order bytes (little endian), or nested lists of numbers.",
        json_schema_extra={"anyOf": [{"type": "string"}, _NESTED_NUMBERS]},
    )

    @model_validator(mode="after")
    def _base64_needs_shape(self) -> EncodedTensor:
        if isinstance(self.data, str) and self.shape is None:
            raise ValueError("shape is required when data is base64")
        return self


class PredictRequest(_Strict):
    inputs: EncodedTensor
    request_id: StrictStr | None = Field(default=None, min_length=1, max_length=128)


class _Usage(_Strict):
    """The client's meter after this request. ``charged``: queries this request was charged
    (one per image; 0 when a repeated ``request_id`` replays a stored answer)."""

    charged: int
    queries_used: int
    queries_remaining: int


class LabelsResponse(_Usage):
    """Label-only answer (the default policy): one predicted class per image, nothing else."""

    labels: list[int]


class TopKResponse(_Usage):
    """The k most likely classes per image, most likely first; ``labels`` is the first of each."""

    labels: list[int]
    top_k: list[list[int]]


class ProbabilitiesResponse(_Usage):
    """Class probabilities rounded to a few decimals (a common MLaaS output)."""

    labels: list[int]
    probabilities: list[list[float]]


class _Screened(_Usage):
    """The answer of a model behind an input defence that can reject images (the sanitised
    twin's ``framework`` mode): a rejected image is charged like an answered one, its entries
    are ``null``, and ``rejected`` lists the indices of the rejected images, ascending."""

    rejected: list[int]


class ScreenedLabelsResponse(_Screened):
    labels: list[int | None]


class ScreenedTopKResponse(_Screened):
    labels: list[int | None]
    top_k: list[list[int] | None]


class ScreenedProbabilitiesResponse(_Screened):
    labels: list[int | None]
    probabilities: list[list[float] | None]


PredictResponse = (
    LabelsResponse
    | TopKResponse
    | ProbabilitiesResponse
    | ScreenedLabelsResponse
    | ScreenedTopKResponse
    | ScreenedProbabilitiesResponse
)


class ModelInfo(_Strict):
    name: str
    dataset: str
    input_shape: list[int]
    input_dtypes: list[str]
    num_classes: int
    output_policy: str


class ModelList(_Strict):
    models: list[ModelInfo]


class ErrorDetail(_Strict):
    code: str
    message: str


class ErrorResponse(_Strict):
    error: ErrorDetail


def encode_tensor(array: np.ndarray) -> EncodedTensor:
    """uint8 or float32 array -> base64 payload (C order, little endian)."""
    array = np.asarray(array)
    dtype: Literal["uint8", "float32"]
    if array.dtype == np.uint8:
        dtype = "uint8"
    elif array.dtype in (np.float32, np.float64):
        dtype, array = "float32", array.astype("<f4")
    else:
        raise WireError(f"dtype must be uint8 or float32, got {array.dtype}")
    data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
    return EncodedTensor(dtype=dtype, shape=list(array.shape), data=data)


def decode_tensor(payload: EncodedTensor, *, max_elements: int | None = None) -> np.ndarray:
    """Payload -> numpy array, validating length, shape and values. Raises WireError."""
    dtype = WIRE_DTYPES[payload.dtype]
    if isinstance(payload.data, str):
        array = _decode_base64(payload, dtype, max_elements)
    else:
        array = _decode_lists(payload, dtype)
    if dtype.kind == "f":
        if not np.isfinite(array).all():
            raise WireError("inputs contain NaN or infinity")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise WireError(
                f"float32 inputs must lie in [0, 1], got values in [{array.min():g}, {array.max():g}]"
            )
    return array


def _decode_base64(payload: EncodedTensor, dtype: np.dtype, max_elements: int | None) -> np.ndarray:
    assert isinstance(payload.data, str)  # the caller dispatches on the type
    if payload.shape is None:
        raise WireError("shape is required when data is base64")
    if any(dim < 0 for dim in payload.shape):
        raise WireError(f"shape must not have negative dimensions, got {echo(payload.shape)}")
    expected = math.prod(payload.shape)  # Python ints: a huge shape cannot overflow
    if max_elements is not None and expected > max_elements:
        raise TensorTooLarge(
            f"shape {echo(payload.shape)} has {expected} values, more than {max_elements}"
        )
    try:
        raw = base64.b64decode(payload.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError(f"data is not valid base64: {exc}") from None
    if len(raw) != expected * dtype.itemsize:
        raise WireError(
            f"data has {len(raw)} bytes but shape {echo(payload.shape)} of {payload.dtype} "
            f"needs {expected * dtype.itemsize}"
        )
    try:
        return np.frombuffer(raw, dtype=dtype).reshape(payload.shape)
    except ValueError as exc:  # e.g. a zero-size shape whose other dimensions overflow
        raise WireError(f"shape {echo(payload.shape)} is not a valid array shape: {exc}") from None


def _decode_lists(payload: EncodedTensor, dtype: np.dtype) -> np.ndarray:
    # numpy would turn "255" into 255.0 and true into 1.0: check every cell is an int or float
    try:
        cells = np.asarray(payload.data, dtype=object)
        if not {type(cell) for cell in cells.flat} <= {int, float}:
            raise TypeError("not a number")
        values = cells.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise WireError(
            "data lists must be rectangular and hold only numbers (no strings or booleans)"
        ) from None
    if payload.shape is not None and list(values.shape) != payload.shape:
        raise WireError(
            f"data lists have shape {list(values.shape)} but shape says {echo(payload.shape)}"
        )
    if dtype == np.uint8:
        if not np.isfinite(values).all():
            raise WireError("inputs contain NaN or infinity")
        if (
            (values != np.round(values)).any()
            or values.min(initial=0) < 0
            or values.max(initial=0) > 255
        ):
            raise WireError("uint8 inputs must be whole numbers in 0..255")
    return values.astype(dtype)


# -- membership challenges (the ground truth never appears in any of these) ---------------------
class MembershipChallengeCreate(_Strict):
    """The admin opens a challenge on ``model`` for ``client_id``: ``n`` candidates (even), half
    members, half non-members, drawn with ``seed``."""

    model: StrictStr = Field(min_length=1, max_length=300)
    client_id: StrictStr = Field(min_length=1, max_length=100)
    n: StrictInt = Field(ge=2, le=100_000)
    seed: StrictInt = Field(default=0, ge=0, le=2**32 - 1)


class MembershipResult(_Strict):
    """The score of a submission (``mlcore.membership_metrics``). ``roc``: TPR at a fixed grid
    of FPRs, aggregate only, for drawing the curve."""

    auc: float
    balanced_accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    roc: dict[str, list[float]]


class MembershipChallenge(_Strict):
    """What the challenged client reads: the candidates (images in a random order, with their
    true class labels, which say nothing about membership) and its remaining query budget."""

    challenge_id: str
    model: str
    n: int
    images: EncodedTensor
    labels: list[int]
    queries_remaining: int
    submitted: bool


class MembershipScores(BaseModel):
    """One score per candidate, in the order given; higher means "member". Not strict, so JSON
    integers are accepted as numbers; NaN and infinity are refused by the service."""

    model_config = ConfigDict(extra="forbid")
    scores: list[float] = Field(max_length=100_000)


class MembershipChallengeView(_Strict):
    """The admin's view: the challenge, where its candidates came from, and the result."""

    challenge_id: str
    model: str
    client_id: str
    n: int
    seed: int
    members_from: str
    non_members_from: str
    created_at: float
    submitted_at: float | None
    result: MembershipResult | None
