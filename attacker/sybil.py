"""Sybil purchases: one selection bought through several accounts (``attacker run --api-keys``).

A detector that watches each account alone sees only that account's share of the queries, the
weakness of per-client detection that the DRMI paper names for PRADA. The selection is split
across the accounts either ``round-robin`` (query i to account i mod N) or ``by-class`` (the
classes of the attacker's own pool labels dealt out to the accounts, so each account's stream
holds few classes). The accounts buy in turns of ``turn`` images, so the service sees their
queries interleaved, in about the selection's order, as a coordinated attacker would send them.

Every account keeps the budget rules of a single one (``oracle.buy``): a 402 spends what is left
of that account's budget and stops that account, a 403 stops it; the others go on. The report
counts what each account was charged and the total.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from attacker.extraction import ExtractionResult, evaluate_substitute, train_on_bought
from attacker.oracle import NOT_BOUGHT, LabelOracle, Meter, Purchase, buy
from mlcore.datasets import ImageDataset

logger = logging.getLogger(__name__)

Split = Literal["round-robin", "by-class"]
SPLITS: tuple[str, ...] = get_args(Split)
TURN = 10  # images an account buys before the next account's turn


def read_api_keys(path: Path) -> list[str]:
    """The keys in ``path``, one per line (blank lines and ``#`` comments skipped). The
    messages name the line, never the key."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--api-keys {str(path)!r} cannot be read: {exc.strerror}") from None
    keys: list[str] = []
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not key.isprintable() or any(char.isspace() for char in key):
            raise ValueError(f"--api-keys line {number}: a key is one token without spaces")
        if key in keys:
            raise ValueError(f"--api-keys line {number}: the same key as line "
                             f"{_line_of(lines, key)}")  # fmt: skip
        keys.append(key)
    if not keys:
        raise ValueError(f"--api-keys {str(path)!r} holds no key (one per line)")
    return keys


def _line_of(lines: list[str], key: str) -> int:
    return next(n for n, line in enumerate(lines, start=1) if line.strip() == key)


def assign_accounts(pool_labels: np.ndarray, accounts: int, split: str) -> np.ndarray:
    """The account (0-based) of each selected query, given the attacker's own label of each."""
    if accounts < 1:
        raise ValueError(f"accounts must be >= 1, got {accounts}")
    if split == "round-robin":
        return np.arange(len(pool_labels)) % accounts
    if split == "by-class":
        classes = np.unique(pool_labels)
        return np.searchsorted(classes, pool_labels) % accounts
    raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def turns(
    accounts: np.ndarray, count: int, *, turn: int = TURN
) -> Iterator[tuple[int, np.ndarray]]:
    """(account, positions) of each purchase, in the order the accounts send them: every
    account in turn buys its next ``turn`` assigned queries, until all are bought (the order
    the service sees; the detection benchmark replays it)."""
    queues = [np.flatnonzero(accounts == a) for a in range(count)]
    for start in range(0, max(map(len, queues), default=0), turn):
        for account, queue in enumerate(queues):
            if start < len(queue):
                yield account, queue[start : start + turn]


def buy_split(
    oracles: list[LabelOracle], images: np.ndarray, accounts: np.ndarray, *, turn: int = TURN
) -> tuple[Purchase, list[str | None]]:
    """Labels for ``images``, image i bought by ``oracles[accounts[i]]``, the accounts taking
    turns of ``turn`` images; returns the purchase and what stopped each account (None: not
    stopped). The purchase's ``stopped_by`` is "blocked" if an account was blocked, else
    "budget" if one ran out."""
    labels = np.full(len(images), NOT_BOUGHT, dtype=np.int64)
    stopped: list[str | None] = [None] * len(oracles)
    for account, chunk in turns(accounts, len(oracles), turn=turn):
        if stopped[account] is not None:
            continue
        purchase = buy(oracles[account], images[chunk])
        labels[chunk] = purchase.labels
        if purchase.stopped_by is not None:
            stopped[account] = purchase.stopped_by
            logger.warning("account %d stopped (%s)", account + 1, purchase.stopped_by)
    worst = "blocked" if "blocked" in stopped else "budget" if "budget" in stopped else None
    return Purchase(labels, worst), stopped  # type: ignore[arg-type]


def sybil_and_evaluate(
    open_oracle: Callable[[str], Any],
    keys: list[str],
    *,
    pool: ImageDataset,
    selection: Any,
    split: str,
    test: ImageDataset,
    arch: str,
    epochs: int,
    batch_size: int,
    seed: int,
    target_labels: np.ndarray | None,
    semi_supervised: bool = False,
) -> tuple[ExtractionResult, dict[str, Any]]:
    """Buy ``selection`` through one oracle per key (``open_oracle(key)``, a context manager),
    train a substitute on every label bought and evaluate it; returns the result and its run
    record: the fields of a one-account run, with the totals over the accounts, and
    ``accounts`` (what each was assigned, bought and charged, and what stopped it)."""
    indices = np.asarray(selection.indices, dtype=np.int64)
    accounts = assign_accounts(pool.labels.numpy()[indices], len(keys), split)
    with ExitStack() as stack:
        oracles = [stack.enter_context(open_oracle(key)) for key in keys]
        purchase, stopped = buy_split(oracles, pool.images.numpy()[indices], accounts)
    bought = purchase.bought
    substitute, arch_kwargs, seconds = train_on_bought(
        pool, indices[bought], purchase.labels[bought], semi_supervised=semi_supervised,
        arch=arch, epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    result = ExtractionResult(
        substitute, arch, arch_kwargs, indices[bought], purchase.labels[bought],
        int(bought.sum()), seconds, purchase.stopped_by,
    )  # fmt: skip
    per_account = [
        {
            "account": number,
            "assigned": int((accounts == number - 1).sum()),
            "bought": int(bought[accounts == number - 1].sum()),
            **oracle.meter.report(),
            "stopped_by": stopped[number - 1],
        }
        for number, oracle in enumerate(oracles, start=1)
    ]
    totals = {field: sum(account[field] for account in per_account) for field in Meter().report()}
    record = {
        "method": selection.method,
        "params": selection.params,
        "k": selection.k,
        "queries_bought": result.queries_bought,
        **totals,
        "stopped_by": result.stopped_by,
        **evaluate_substitute(substitute, test, target_labels=target_labels),
        "train_seconds": round(seconds, 2),
        "seed": seed,
        "semi_supervised": semi_supervised,
        "split": split,
        "accounts": per_account,
    }
    return result, record
