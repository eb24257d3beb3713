"""The service's domain errors; ``app.py`` maps every one of them to HTTP in a single handler.

ServiceError (code, status)
├── BadRequest        400  a body that is not UTF-8, nested too deeply, or compressed
├── Unauthorized      401  missing / unknown / revoked API key
├── Forbidden         403  not an admin, or blocked by a detector
├── BudgetExhausted   402  the batch does not fit the remaining budget
│   └── QuotaExceeded 402  a training job does not fit the remaining training quota
├── NotFound          404  unknown model or client
├── BodyTimeout       408  the body did not arrive in time
├── Conflict          409  a request_id reused for different inputs, a model name taken,
│                          a second submission to a membership challenge
├── LengthRequired    411  a body without Content-Length or chunked encoding
├── PayloadTooLarge   413  batch or body over the limit
├── InvalidInput      422  shape, dtype, values, JSON
├── RateLimited       429  too many requests per second
└── StateUnavailable  503  the state database does not answer (down, restarting)

The framework's own refusals (405, 408, 411, 413, 422, ...) get the same body; ``documented``
puts every one a route can return in the OpenAPI spec.
"""

from __future__ import annotations

from typing import Any

from mlcore.wire import ErrorResponse

# What each status means here, and the error codes it carries (the OpenAPI description).
STATUS_CODES: dict[int, str] = {
    400: "undecodable_body, too_deeply_nested, unsupported_content_encoding",
    401: "missing_api_key, unknown_api_key, revoked_api_key",
    402: "budget_exhausted",
    403: "not_admin, admin_disabled, blocked",
    404: "not_found, unknown_model, unknown_client, unknown_challenge",
    405: "method_not_allowed (the Allow header lists the methods)",
    408: "body_timeout: the body did not arrive within TARGET_BODY_TIMEOUT seconds",
    409: "request_id_reused, already_submitted",
    411: "length_required: a body needs Content-Length or chunked Transfer-Encoding",
    413: "body_too_large, batch_too_large",
    422: "invalid_input, malformed_json, invalid_shape, empty_batch, invalid_scores, no_members",
    429: "rate_limited",
    500: "internal_error",
    503: "state_unavailable: the state database does not answer; retry (with the same "
    "request_id: a request that was charged is never charged twice)",
}

BODY_STATUSES = (400, 408, 411, 413, 422)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these statuses, each with the one error body."""
    return {
        status: {"model": ErrorResponse, "description": STATUS_CODES[status]} for status in statuses
    }


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class BudgetExhausted(ServiceError):
    status, code = 402, "budget_exhausted"


class QuotaExceeded(BudgetExhausted):
    code = "training_quota_exceeded"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class BodyTimeout(ServiceError):
    status, code = 408, "body_timeout"


class LengthRequired(ServiceError):
    status, code = 411, "length_required"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


def body_too_large(max_bytes: int) -> PayloadTooLarge:
    """The one refusal of a request body over ``max_bytes`` (read whole or streamed)."""
    return PayloadTooLarge(
        f"request body over the limit of {max_bytes} bytes", code="body_too_large"
    )


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"


class StateUnavailable(ServiceError):
    status, code = 503, "state_unavailable"
