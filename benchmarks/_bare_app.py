"""The baseline of ``service_throughput.py``: the same predict route, doing nothing.

It parses the same JSON body with FastAPI and pydantic and answers one constant label per
image, in a sync route (run in the thread pool, like the real one): no authentication, no
decoding, no model, no ledger. Serve it with
``uvicorn _bare_app:app --app-dir benchmarks``.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title="bare baseline")


class Inputs(BaseModel):
    dtype: str
    shape: list[int]
    data: str


class PredictBody(BaseModel):
    inputs: Inputs
    request_id: str | None = None


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/models/{name}/predict")
def predict(name: str, body: PredictBody) -> dict[str, object]:
    n = body.inputs.shape[0] if body.inputs.shape else 0
    return {"labels": [0] * n, "queries_used": 0, "queries_remaining": 0}
