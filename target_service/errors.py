"""The service's domain errors; ``app.py`` maps every one of them to HTTP in a single handler.

ServiceError (code, status)
├── Unauthorized      401  missing / unknown / revoked API key
├── Forbidden         403  not an admin, or blocked by a detector
├── BudgetExhausted   402  the batch does not fit the remaining budget
│   └── QuotaExceeded 402  a training job does not fit the remaining training quota
├── NotFound          404  unknown model or client
├── Conflict          409  a request_id reused for different inputs, a model name taken
├── PayloadTooLarge   413  batch or body over the limit
├── InvalidInput      422  shape, dtype, values, JSON
└── RateLimited       429  too many requests per second
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


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


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"
