"""``attacker``: select queries, buy labels, train a substitute, and report.

attacker select  --method drmi --pool mnist-embedded:pool --k 300 -o drmi300.json
attacker extract --url URL --api-key KEY --model lenet5-mnist --selection drmi300.json -o sub.pt
attacker transfer --url URL --api-key KEY --model lenet5-mnist --substitute sub.pt --targeted \
                  --eps 0.5 --seeds 500 --report-dir r/
attacker run     --url URL --api-key KEY --model lenet5-mnist --method drmi --k 300 --report-dir r/
attacker membership --url URL --api-key KEY --challenge ID --attack threshold --report-dir r/
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="The mlaas-range attacker: DRMI query selection, model extraction and transfer attacks.",
    no_args_is_help=True,
)
console = Console(stderr=True)

DEFAULT_CACHE = Path.home() / ".cache" / "mlaas-range" / "answers.sqlite3"
JBDA_SEED_SIZE = 100  # JbDA's seed images: its smallest budget

Url = Annotated[str, typer.Option(help="Target service URL.", envvar="ATTACKER_URL")]
ApiKey = Annotated[str, typer.Option(help="Your API key.", envvar="ATTACKER_API_KEY")]
Model = Annotated[str, typer.Option(help="Hosted model name.")]
Pool = Annotated[str, typer.Option(help="The attacker's own labelled pool, name:split.")]
TestSet = Annotated[str, typer.Option("--test", help="Test set, name:split.")]
DataRoot = Annotated[Path | None, typer.Option(help="Root of full datasets (for mnist, usps...).")]
Arch = Annotated[str, typer.Option(help="Substitute architecture.")]
Epochs = Annotated[int, typer.Option(min=1, help="Substitute training epochs.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Substitute batch size (paper: 4 on MNIST).")]
Seed = Annotated[int, typer.Option(help="Seed of the random baseline and of training.")]
EvalKey = Annotated[
    str | None,
    typer.Option(
        help="A separate API key used only to label the test set, for the agreement figure "
        "(kept apart so evaluation never spends the attack's budget).",
        envvar="ATTACKER_EVAL_API_KEY",
    ),
]
CachePath = Annotated[
    Path,
    typer.Option(
        help="Answer cache: a re-run never re-buys a label. Scoped to the API key (by a hash of "
        "it): labels another account bought are not reused."
    ),
]
SharedCache = Annotated[
    Path | None,
    typer.Option(
        help="Use this answer cache shared between accounts instead of --cache: labels any "
        "account bought are reused (a Sybil strategy; the report says it was used)."
    ),
]
Rounds = Annotated[
    int, typer.Option(help="Adaptive methods (knockoff-adaptive, activethief-*): purchase rounds.")
]
SeedFraction = Annotated[
    float,
    typer.Option(
        help="ActiveThief, and guided methods against a label-only target: share of k bought "
        "at random first, to train the attacker's own model."
    ),
]
RoundEpochs = Annotated[
    int, typer.Option(min=1, help="Adaptive methods: epochs of the substitute between rounds.")
]
SemiSupervised = Annotated[
    bool,
    typer.Option(
        help="Train the substitute on the bought labels plus the unlabeled rest of the pool "
        "(FixMatch; --batch-size is then unused). Costs no extra queries."
    ),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request is noise


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _selector_params(
    method: str, *, alpha: float, init: str, bins: int, starts: int | None, seed: int
) -> dict:
    if method == "drmi":
        return {"alpha": alpha, "init": init, "bins": bins, "starts": starts}
    from attacker.selection import SELECTORS

    if method not in SELECTORS:
        return {"seed": seed}  # make_selector names the unknown method
    accepted = inspect.signature(SELECTORS[method]).parameters  # e.g. TRACE: init, starts, seed
    return {
        name: value
        for name, value in {"init": init, "starts": starts, "seed": seed}.items()
        if name in accepted
    }


def _select(
    pool_spec: str,
    data_root: Path | None,
    method: str,
    k: int,
    params: dict[str, Any],
    *,
    guide: np.ndarray | None = None,
    guide_source: dict[str, Any] | None = None,
):
    """Run selector ``method`` on the pool; ``guide`` (and where it came from, for the
    selection file) for the strategies that need one."""
    from attacker.selection import Selection, make_selector
    from mlcore.datasets import load_dataset

    pool = load_dataset(pool_spec, data_root=data_root)
    selector = make_selector(method, **params)  # DRMI reports its progress through logging
    started = time.perf_counter()
    result = selector(pool.images.numpy(), pool.labels.numpy(), k=k, guide=guide)
    seconds = time.perf_counter() - started
    selection = Selection.from_result(
        result, pool=pool_spec, method=method, params=params, guide=guide_source
    )
    return pool, selection, seconds


def _guide_from_model(
    method: str, guide_model: Path | None, pool_spec: str, data_root: Path | None
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The guide ``method`` needs, computed by the model in checkpoint ``guide_model``."""
    from attacker.selection import SELECTORS
    from attacker.selection.guides import guide_from_checkpoint
    from mlcore.datasets import load_dataset

    kind = SELECTORS[method].guide if method in SELECTORS else None
    if kind is None:
        if guide_model is not None:
            guided = ", ".join(name for name, cls in sorted(SELECTORS.items()) if cls.guide)
            raise ValueError(
                f"--guide-model is for the guided methods ({guided}); {method} uses none"
            )
        return None, None
    if guide_model is None:
        raise ValueError(
            f"--method {method} needs the {kind} of a model on the pool images: give "
            "--guide-model CHECKPOINT (e.g. a substitute from `attacker extract`)"
        )
    pool = load_dataset(pool_spec, data_root=data_root)
    return guide_from_checkpoint(guide_model, kind, pool.images.numpy())


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=2)


@app.command()
def select(
    method: Annotated[
        str,
        typer.Option(
            help="drmi | random | cmal | hcp | lcp | kmeans | pca-kmeans | trace-min | trace-max"
        ),
    ] = "drmi",
    pool: Pool = "mnist-embedded:pool",
    k: Annotated[int, typer.Option(help="How many queries to select.")] = 300,
    alpha: Annotated[float, typer.Option(help="DRMI: I = MI^alpha.")] = 2.0,
    init: Annotated[str, typer.Option(help="DRMI, TRACE: min-sum | min-max.")] = "min-sum",
    bins: Annotated[
        int, typer.Option(help="DRMI: histogram bins (256 = one per intensity).")
    ] = 256,
    starts: Annotated[
        int | None, typer.Option(help="DRMI, TRACE: start vertices (default all: exact).")
    ] = None,
    seed: Seed = 0,
    data_root: DataRoot = None,
    guide_model: Annotated[
        Path | None,
        typer.Option(
            help="hcp, lcp, kmeans, pca-kmeans: class probabilities, trace-*: activations of "
            "the pool images by this local checkpoint (e.g. a substitute)."
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("selection.json"),
) -> None:
    """Choose which pool images to buy labels for, and save the choice as JSON."""
    try:
        _check_offline(method)
        params = _selector_params(
            method, alpha=alpha, init=init, bins=bins, starts=starts, seed=seed
        )
        guide, guide_source = _guide_from_model(method, guide_model, pool, data_root)
        _, selection, seconds = _select(
            pool, data_root, method, k, params, guide=guide, guide_source=guide_source
        )
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    selection.save(output)
    guided = "" if guide_model is None else f" guided by {guide_model}"
    console.print(
        f"selected {selection.k} of {pool} with {method}{guided} in {seconds:.1f} s -> {output}"
    )


def _oracle(
    url: str,
    api_key: str,
    model: str,
    cache: Path,
    progress: Progress | None = None,
    total: int = 0,
    *,
    shared_cache: Path | None = None,
):
    """The HTTP oracle of one account: its own answer cache ``cache``, or ``shared_cache``."""
    from attacker.oracle import HttpOracle

    on_batch = None
    if progress is not None:
        task = progress.add_task(f"buying labels from {model}", total=total)

        def on_batch(n: int) -> None:
            progress.advance(task, n)

    return HttpOracle(
        url,
        api_key,
        model,
        cache_path=shared_cache or cache,
        shared_cache=shared_cache is not None,
        on_batch=on_batch,
    )


def _target_labels(
    url: str, eval_key: str | None, model: str, cache: Path, test
) -> np.ndarray | None:
    """The target's labels on the test set, bought with the separate evaluation key."""
    if eval_key is None:
        return None
    with _oracle(url, eval_key, model, cache) as oracle:
        return oracle.predict_labels(test.images.numpy())


def _check_url(url: str) -> None:
    import httpx2

    try:
        parsed = httpx2.URL(url)
    except Exception:  # httpx2 raises its own InvalidURL, or TypeError / ValueError
        raise ValueError(f"--url must be an http(s) URL, got {url!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--url must be an http(s) URL, got {url!r}")


def _check_key(option: str, key: str) -> None:
    """A bearer token: non-empty, printable, no spaces. The message never quotes the key."""
    if not key:
        raise ValueError(f"{option} must not be empty")
    if not key.isprintable() or any(char.isspace() for char in key):
        raise ValueError(f"{option} must be one token without spaces or control characters")


def _check_writable(option: str, path: Path, *, folder: bool = False) -> None:
    """``path`` (a folder, or a file's folder) exists or can be made, and can be written to."""
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {str(path)!r} cannot be created: {exc.strerror}") from None
    if not os.access(where, os.W_OK):
        raise ValueError(f"{option} {str(path)!r} is not writable")
    if not folder and path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder, not a file")


def _extract_and_evaluate(
    *,
    url: str,
    api_key: str,
    model: str,
    pool,
    selection,
    test,
    arch: str,
    epochs: int,
    batch_size: int,
    seed: int,
    cache: Path,
    shared_cache: Path | None,
    target_labels: np.ndarray | None,
    semi_supervised: bool = False,
) -> tuple[Any, dict[str, Any]]:
    from attacker.extraction import evaluate_substitute, extract

    indices = np.asarray(selection.indices)
    with (
        _progress() as progress,
        _oracle(
            url, api_key, model, cache, progress, total=len(indices), shared_cache=shared_cache
        ) as oracle,
    ):
        train_task = progress.add_task("training substitute", total=epochs, start=False)

        def on_epoch(epoch: int, _epochs: int, _loss: float) -> None:
            progress.start_task(train_task)
            progress.update(train_task, completed=epoch)

        result = extract(
            oracle,
            pool,
            indices,
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            semi_supervised=semi_supervised,
            progress=on_epoch,
        )
    run = {
        "method": selection.method,
        "params": selection.params,
        "k": selection.k,
        "queries_bought": result.queries_bought,
        **oracle.meter.report(),
        "stopped_by": result.stopped_by,
        **evaluate_substitute(result.substitute, test, target_labels=target_labels),
        "train_seconds": round(result.train_seconds, 2),
        "seed": seed,
        "semi_supervised": semi_supervised,
    }
    return result, run


def _jbda_and_evaluate(
    *,
    url: str,
    api_key: str,
    model: str,
    pool,
    k: int,
    test,
    arch: str,
    seed: int,
    cache: Path,
    shared_cache: Path | None,
    target_labels: np.ndarray | None,
) -> tuple[Any, dict[str, Any]]:
    """JbDA spends ``k`` queries on synthetic points (its own schedule: 100 seeds, lambda 0.1,
    sign flip after 3 rounds, 10 epochs per round)."""
    from attacker.jbda import jbda_extract

    with (
        _progress() as progress,
        _oracle(url, api_key, model, cache, progress, total=k, shared_cache=shared_cache) as oracle,
    ):
        result = jbda_extract(oracle, pool, k=k, arch=arch, seed_size=JBDA_SEED_SIZE, seed=seed)
    params = {"seed_size": JBDA_SEED_SIZE, "lambda": 0.1, "tau": 3, "epochs_per_round": 10}
    return result, _run_record(
        "jbda", params, k, result, oracle, test=test, target_labels=target_labels, seed=seed
    )


def _run_record(
    method: str,
    params: dict[str, Any],
    k: int,
    result,
    oracle,
    *,
    test,
    target_labels: np.ndarray | None,
    seed: int,
) -> dict[str, Any]:
    """The report's fields for one extraction run: what was bought and paid, and how good the
    substitute is."""
    from attacker.extraction import evaluate_substitute

    return {
        "method": method,
        "params": params,
        "k": k,
        "queries_bought": result.queries_bought,
        **oracle.meter.report(),
        "stopped_by": result.stopped_by,
        **evaluate_substitute(result.substitute, test, target_labels=target_labels),
        "train_seconds": round(result.train_seconds, 2),
        "seed": seed,
    }


def _check_offline(method: str) -> None:
    """``select`` runs without the target; an adaptive method cannot."""
    from attacker.selection.online import ADAPTIVE_METHODS

    if method in ADAPTIVE_METHODS:
        raise ValueError(
            f"--method {method} buys its labels in rounds from the target: use `attacker run` "
            f"or `attacker extract --method {method}`"
        )


def _target_probabilities(url: str, api_key: str, model: str) -> bool:
    """Whether the target's output policy returns probabilities (``GET /v1/models``, free)."""
    from attacker.oracle import HttpOracle, OracleError

    try:
        with HttpOracle(url, api_key, model) as oracle:
            return oracle.output_policy().startswith("probabilities")
    except OracleError as exc:
        raise ValueError(f"cannot read the output policy of {model!r}: {exc}") from None


def _online_and_evaluate(
    *,
    url: str,
    api_key: str,
    model: str,
    pool,
    online,
    k: int,
    test,
    arch: str,
    epochs: int,
    round_epochs: int,
    batch_size: int,
    seed: int,
    cache: Path,
    shared_cache: Path | None,
    target_labels: np.ndarray | None,
    semi_supervised: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """An online method (``attacker.selection.online``): buys in rounds, or (a guided selector
    against a target that returns probabilities) guides the selection with the target's
    answers on the whole pool; the progress bar shows the rounds."""
    from attacker.extraction import ExtractionResult, train_on_bought
    from attacker.selection.online import select_with_target_guide
    from attacker.selection.rounds import run_rounds

    buying = len(pool) if online.strategy is None else k
    rounds: list[dict[str, Any]] = []
    learnt: dict[str, Any] = {}
    with (
        _progress() as progress,
        _oracle(
            url, api_key, model, cache, progress, total=buying, shared_cache=shared_cache
        ) as oracle,
    ):
        train_task = progress.add_task("training substitute", total=epochs, start=False)

        def on_epoch(epoch: int, _epochs: int, _loss: float) -> None:
            progress.start_task(train_task)
            progress.update(train_task, completed=epoch)

        if online.strategy is None:
            indices, labels = select_with_target_guide(
                oracle, pool.images.numpy(), pool.labels.numpy(), online.selector, k=k
            )
            substitute, arch_kwargs, seconds = train_on_bought(
                pool, indices, labels, semi_supervised=semi_supervised, arch=arch,
                epochs=epochs, batch_size=batch_size, seed=seed, progress=on_epoch,
            )  # fmt: skip
            result = ExtractionResult(
                substitute, arch, arch_kwargs, indices, labels, len(indices), seconds
            )
        else:
            planned = len(online.strategy.round_sizes(k))
            round_task = progress.add_task(f"{online.method}: round 0/{planned}", total=planned)

            def on_round(done: int, total: int) -> None:
                progress.update(
                    round_task, completed=done, description=f"{online.method}: round {done}/{total}"
                )

            result = run_rounds(
                online.strategy, oracle, pool, k=k, arch=arch, epochs=epochs,
                round_epochs=round_epochs, batch_size=batch_size, seed=seed,
                semi_supervised=semi_supervised, on_round=on_round, progress=on_epoch,
            )  # fmt: skip
            rounds, learnt = result.rounds, result.strategy
    run = _run_record(
        online.method, online.params, k, result, oracle, test=test, target_labels=target_labels,
        seed=seed,
    )  # fmt: skip
    return result, {
        **run, "guide_source": online.guide_source, "rounds": rounds, **learnt,
        "semi_supervised": semi_supervised,
    }  # fmt: skip


@app.command("simulate-benign")
def simulate_benign(
    url: Url,
    api_key: ApiKey,
    model: Model = "lenet5-mnist",
    queries: Annotated[int, typer.Option(min=1, help="How many images to send.")] = 1000,
    images: Annotated[
        str, typer.Option(help="Natural images to draw from, name:split.")
    ] = "mnist-embedded:test",
    repeat_rate: Annotated[
        float, typer.Option(help="Share of queries re-sending a recent one.")
    ] = 0.1,
    noise: Annotated[float, typer.Option(help="Pixel noise (std, [0,1] units) on repeats.")] = 0.02,
    request_size: Annotated[int, typer.Option(min=1, help="Images per request.")] = 10,
    seed: Seed = 0,
    data_root: DataRoot = None,
) -> None:
    """Behave like a normal customer: natural images in random order, with repeats and
    near-duplicates (a defence must not flag this client). Each run is a new session: it sends
    (and pays for) its queries again, however often it is run with the same seed."""
    from attacker.oracle import Blocked, BudgetExhausted, HttpOracle, OracleError
    from mlcore.datasets import load_dataset
    from mlcore.streams import benign_stream

    try:
        source = load_dataset(images, data_root=data_root)
        stream = benign_stream(
            source.images, queries, repeat_rate=repeat_rate, noise=noise, seed=seed
        )
    except ValueError as exc:
        raise _fail(exc) from None
    x, truth = stream.images.numpy(), source.labels[stream.source].numpy()
    outcome, blocked = "answered every query", False
    # No answer cache, and request ids of this run only (retries inside it keep theirs): a
    # detector must see every query a benign client sends, however often it is run.
    with HttpOracle(
        url, api_key, model, batch_size=request_size, request_nonce=secrets.token_hex(8)
    ) as oracle:
        try:
            answers = oracle.predict_labels(x)
        except (Blocked, BudgetExhausted) as exc:
            answers, outcome, blocked = exc.labels, f"stopped: {exc}", isinstance(exc, Blocked)
        except OracleError as exc:
            raise _fail(exc) from None
    answered = answers >= 0
    meter = oracle.meter.report()
    console.print(
        f"benign client sent {int(answered.sum())} of {queries} queries "
        f"({int(stream.repeated.sum())} repeats); {outcome}; the target's answers were right on "
        f"{(answers[answered] == truth[answered]).mean():.2%} of them; queries_paid "
        f"{meter['queries_paid']}, queries_replayed {meter['queries_replayed']}"
    )
    if blocked:
        raise typer.Exit(code=3)


@app.command()
def extract(
    url: Url,
    api_key: ApiKey,
    model: Model = "lenet5-mnist",
    selection_path: Annotated[
        Path, typer.Option("--selection", help="From `attacker select`.")
    ] = Path("selection.json"),
    method: Annotated[
        str | None,
        typer.Option(
            help="Instead of --selection, an online method that buys while it chooses: "
            "knockoff-adaptive, activethief-entropy, activethief-kcenter or a guided selector."
        ),
    ] = None,
    k: Annotated[int, typer.Option(help="With --method: labels to buy.")] = 300,
    pool_spec: Annotated[
        str, typer.Option("--pool", help="With --method: the attacker's pool, name:split.")
    ] = "mnist-embedded:pool",
    rounds: Rounds = 10,
    seed_fraction: SeedFraction = 0.1,
    round_epochs: RoundEpochs = 10,
    arch: Arch = "lenet5",
    epochs: Epochs = 30,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    test: TestSet = "mnist-embedded:test",
    data_root: DataRoot = None,
    eval_api_key: EvalKey = None,
    cache: CachePath = DEFAULT_CACHE,
    shared_cache: SharedCache = None,
    semi_supervised: SemiSupervised = False,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("substitute.pt"),
) -> None:
    """Buy the selected labels (or run an online --method) and train a substitute; save it as
    a checkpoint. A 402 or 403 part-way keeps the labels bought, trains on them and says so
    (``stopped_by``)."""
    from attacker.oracle import OracleError
    from attacker.selection import Selection
    from attacker.selection.online import is_online
    from mlcore.checkpoints import save_checkpoint
    from mlcore.datasets import load_dataset

    try:
        if method is not None:  # every check before a label is bought
            pool = load_dataset(pool_spec, data_root=data_root)
            if not is_online(method):
                raise ValueError(
                    f"--method {method} is not an online method: run `attacker select --method "
                    f"{method}` and pass the file as --selection"
                )
            if not 1 <= k <= len(pool):
                raise ValueError(f"--k must be in 1..{len(pool)} (the pool size), got {k}")
            online = _online_builder(
                url, api_key, model, rounds=rounds, seed_fraction=seed_fraction, seed=seed,
                params=lambda name: _selector_params(
                    name, alpha=2.0, init="min-sum", bins=256, starts=None, seed=seed
                ),
            )(method, k)  # fmt: skip
        else:
            selection = Selection.load(selection_path)
            pool_spec = selection.pool
            pool = load_dataset(pool_spec, data_root=data_root)
        test_set = load_dataset(test, data_root=data_root)
        labels = _target_labels(url, eval_api_key, model, cache, test_set)
        common: dict[str, Any] = dict(
            url=url, api_key=api_key, model=model, pool=pool, test=test_set, arch=arch,
            epochs=epochs, batch_size=batch_size, seed=seed, cache=cache, shared_cache=shared_cache,
            target_labels=labels, semi_supervised=semi_supervised,
        )  # fmt: skip
        if method is not None:
            result, run = _online_and_evaluate(
                online=online, k=k, round_epochs=round_epochs, **common
            )
        else:
            result, run = _extract_and_evaluate(selection=selection, **common)
        run["shared_cache"] = None if shared_cache is None else str(shared_cache)
    except (OracleError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    save_checkpoint(
        output,
        result.substitute,
        arch=arch,
        arch_kwargs=result.arch_kwargs,
        dataset=pool_spec,
        metrics=run,
    )
    _print_runs([run])
    _warn_stopped(run["stopped_by"])
    console.print(f"substitute -> {output}")


def _transfer_step(
    *,
    url: str,
    api_key: str,
    model: str,
    substitute,
    seed_set,
    attack,
    targeted: bool,
    seeds: int,
    seed: int,
    noise_baseline: bool,
    cache: Path,
    shared_cache: Path | None,
    send_all: bool = False,
    adaptive: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Craft on the substitute, send what fools it (or everything) to the target; returns the
    summary. ``adaptive`` (the substitute's checkpoint, pool, selection and twin settings) runs
    the adaptive attack instead (``attacker.adaptive``)."""
    from attacker.transfer import transfer_attack

    with (
        _progress() as progress,
        _oracle(url, api_key, model, cache, shared_cache=shared_cache) as oracle,
    ):
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        step: dict[str, Any] = dict(
            targeted=targeted, seeds=seeds, seed=seed, noise_baseline=noise_baseline,
            send_all=send_all, progress=on_progress,
        )  # fmt: skip
        if adaptive is not None:
            from attacker.adaptive import adaptive_step

            summary = adaptive_step(oracle, seed_set, attack=attack, **adaptive, **step)
        else:
            result = transfer_attack(oracle, substitute, seed_set, attack=attack, **step)
            summary = result.summary()
    summary.update(
        url=url, model=model, shared_cache=None if shared_cache is None else str(shared_cache)
    )
    return summary


def _print_transfer(summary: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2%}"

    mode = "targeted" if summary["targeted"] else "untargeted"
    table = Table(
        "attack", "crafted", "fooled substitute", "sent", "rejected", "fooled target",
        "transferability", "noise baseline", "queries (examples + noise)",
    )  # fmt: skip
    table.add_row(
        f"{mode} {summary['attack_description']}",
        str(summary["crafted"]),
        str(summary["fooled_substitute"]),
        str(summary["sent"]),
        str(summary["rejected"]),
        str(summary["fooled_target"]),
        pct(summary["transferability"]),
        pct(summary["noise_baseline"]),
        f"{summary['sent']} + {summary['noise_queries']}",
    )
    Console().print(table)
    console.print(
        f"queries_paid {summary['queries_paid']}, queries_replayed {summary['queries_replayed']}, "
        f"queries_from_cache {summary['queries_from_cache']}"
    )
    if summary["transferability_all"] is not None:
        console.print(
            f"over every crafted example (the paper's definition): "
            f"{summary['transferability_all']:.2%}"
        )
    _warn_stopped(summary["stopped_by"], "figures cover what was sent before that")


def _warn_stopped(
    stopped_by: str | None, consequence: str = "trained on the labels bought"
) -> None:
    if stopped_by is not None:
        why = "budget exhausted" if stopped_by == "budget" else "blocked by the service"
        console.print(f"[yellow]{why}: {consequence}[/yellow]")


@app.command()
def transfer(
    url: Url,
    api_key: ApiKey,
    model: Model = "lenet5-mnist",
    substitute: Annotated[
        Path, typer.Option(help="Substitute checkpoint (from `attacker extract`).")
    ] = Path("substitute.pt"),
    targeted: Annotated[
        bool,
        typer.Option(
            "--targeted/--untargeted",
            help="Targeted: one example per other class for each seed; untargeted: one per seed.",
        ),
    ] = True,
    eps: Annotated[
        str | None,
        typer.Option(
            help="Perturbation bound in [0, 1] pixel units, a number or a fraction like 128/255 "
            "(default 0.5 targeted, 0.3 untargeted, as the paper)."
        ),
    ] = None,
    attack_name: Annotated[
        str,
        typer.Option(
            "--attack",
            help="pgd (Madry et al.), igsm (untargeted iterative FGSM, as 'Less is More') or cw "
            "(Carlini-Wagner L2).",
        ),
    ] = "pgd",
    norm: Annotated[str | None, typer.Option(help="PGD norm: linf (default) | l2.")] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Iterations (default: PGD 40, IGSM 10, C&W 1000 Adam steps per round)."),
    ] = None,
    step_size: Annotated[
        float | None,
        typer.Option(help="PGD / IGSM step (default PGD 2.5 * eps / steps, IGSM 0.05)."),
    ] = None,
    random_start: Annotated[
        bool | None, typer.Option(help="PGD: start at a random point (default on).")
    ] = None,
    early_stop: Annotated[
        bool | None,
        typer.Option(
            help="PGD: stop moving an example once it fools the substitute (default off)."
        ),
    ] = None,
    kappa: Annotated[float | None, typer.Option(help="C&W: confidence margin (default 0).")] = None,
    binary_search_steps: Annotated[
        int | None, typer.Option(help="C&W: rounds of the search over c (default 9).")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="C&W: Adam learning rate (default 0.01).")
    ] = None,
    initial_const: Annotated[
        float | None, typer.Option(help="C&W: first c (default 0.001).")
    ] = None,
    adaptive: Annotated[
        bool,
        typer.Option(
            help="Adaptive attack on a KL-sanitised target: build a self-sanitised twin of the "
            "substitute from its bought labels (--selection) and craft PGD examples that keep "
            "KL(substitute || twin) low."
        ),
    ] = False,
    selection_path: Annotated[
        Path | None,
        typer.Option(
            "--selection",
            help="Adaptive: the selection the substitute was extracted from; its labels are "
            "bought again (free from the answer cache of the same account).",
        ),
    ] = None,
    twin_threshold: Annotated[
        float, typer.Option(help="Adaptive: self-sanitisation threshold of the twin.")
    ] = 0.9999999,
    twin_epochs: Annotated[int, typer.Option(min=1, help="Adaptive: twin training epochs.")] = 30,
    kl_weight: Annotated[
        float, typer.Option(help="Adaptive: weight of KL(substitute || twin) in PGD's objective.")
    ] = 1.0,
    seeds: Annotated[
        int, typer.Option(min=1, help="Seed images (the substitute classifies them correctly).")
    ] = 500,
    test: Annotated[str, typer.Option("--test", help="Seed images are drawn from this set.")] = (
        "mnist-embedded:test"
    ),
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of the seed draw, PGD and the noise.")] = 0,
    noise_baseline: Annotated[
        bool,
        typer.Option(
            help="Also send random noise of the same size as each example sent (one query each, "
            "counted as noise_queries) to measure the baseline."
        ),
    ] = True,
    send_all: Annotated[
        bool,
        typer.Option(
            help="The paper's protocol: seeds are random test images and every crafted example "
            "is sent (costs more queries), giving transferability_all beside our conditional "
            "transferability."
        ),
    ] = False,
    cache: CachePath = DEFAULT_CACHE,
    shared_cache: SharedCache = None,
    report_dir: Annotated[
        Path, typer.Option(help="Where transfer.json / transfer.md / plots go.")
    ] = Path("reports"),
) -> None:
    """Craft adversarial examples on the substitute (PGD, IGSM or C&W L2; --adaptive against a
    KL-sanitised target) and send those that fool it to the target. Every option is checked
    before anything is bought."""
    from attacker.oracle import OracleError
    from attacker.selection import Selection
    from attacker.transfer import make_attack, write_transfer_report
    from mlcore.checkpoints import CheckpointError, load_checkpoint
    from mlcore.datasets import load_dataset

    try:
        attack = make_attack(
            attack_name, targeted=targeted, eps=eps, norm=norm, steps=steps, step_size=step_size,
            random_start=random_start, early_stop=early_stop, seed=seed, kappa=kappa,
            binary_search_steps=binary_search_steps, learning_rate=learning_rate,
            initial_const=initial_const,
        )  # fmt: skip
        if adaptive:
            if attack_name != "pgd":
                raise ValueError(
                    f"--adaptive extends PGD; it does not run with --attack {attack_name}"
                )
            if selection_path is None:
                raise ValueError("--adaptive needs --selection (the substitute's bought images)")
            if not 0.0 < twin_threshold < 1.0:
                raise ValueError(f"--twin-threshold must be in (0, 1), got {twin_threshold}")
            if not kl_weight > 0:
                raise ValueError(f"--kl-weight must be > 0, got {kl_weight}")
        elif selection_path is not None:
            raise ValueError("--selection is used only with --adaptive")
        checkpoint = load_checkpoint(substitute)
        seed_set = load_dataset(test, data_root=data_root)
        twin_plan = None
        if selection_path is not None:
            chosen = Selection.load(selection_path)
            twin_plan = dict(
                checkpoint=checkpoint, pool=load_dataset(chosen.pool, data_root=data_root),
                indices=chosen.indices, twin_threshold=twin_threshold, twin_epochs=twin_epochs,
                kl_weight=kl_weight,
            )  # fmt: skip
        summary = _transfer_step(
            url=url, api_key=api_key, model=model, substitute=checkpoint.model, seed_set=seed_set,
            attack=attack, targeted=targeted, seeds=seeds, seed=seed,
            noise_baseline=noise_baseline, cache=cache, shared_cache=shared_cache, send_all=send_all,
            adaptive=twin_plan,
        )  # fmt: skip
    except (OracleError, CheckpointError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    summary["substitute"] = str(substitute)
    path = write_transfer_report(report_dir, summary)
    _print_transfer(summary)
    console.print(f"report -> {path} (and transfer.md, confusion.png, success_vs_queries.png)")


@app.command()
def run(
    url: Url,
    api_key: Annotated[
        str | None, typer.Option(help="Your API key.", envvar="ATTACKER_API_KEY")
    ] = None,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            help="Sybil: a file of API keys, one per line, instead of --api-key; each "
            "selection is split across these accounts (--split) and bought through all of them."
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Sybil (--api-keys): round-robin | by-class.")
    ] = "round-robin",
    model: Model = "lenet5-mnist",
    method: Annotated[
        list[str] | None,
        typer.Option(
            help="Method(s): drmi, random, jbda (Papernot et al.), knockoff-random, "
            "knockoff-adaptive, activethief-entropy, activethief-kcenter, and the guided selectors."
        ),
    ] = None,
    k: Annotated[
        list[int] | None, typer.Option(help="Budget(s) to try; one substitute each.")
    ] = None,
    pool: Pool = "mnist-embedded:pool",
    test: TestSet = "mnist-embedded:test",
    alpha: Annotated[float, typer.Option(help="DRMI: I = MI^alpha.")] = 2.0,
    init: Annotated[str, typer.Option(help="DRMI: min-sum | min-max.")] = "min-sum",
    bins: Annotated[int, typer.Option(help="DRMI: histogram bins.")] = 256,
    starts: Annotated[int | None, typer.Option(help="DRMI: start vertices (default all).")] = None,
    rounds: Rounds = 10,
    seed_fraction: SeedFraction = 0.1,
    round_epochs: RoundEpochs = 10,
    arch: Arch = "lenet5",
    epochs: Epochs = 30,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    data_root: DataRoot = None,
    eval_api_key: EvalKey = None,
    cache: CachePath = DEFAULT_CACHE,
    shared_cache: SharedCache = None,
    semi_supervised: SemiSupervised = False,
    report_dir: Annotated[Path, typer.Option(help="Where report.json / report.md go.")] = Path(
        "reports"
    ),
    transfer: Annotated[
        bool, typer.Option(help="Finish with a transfer attack from the last substitute.")
    ] = True,
    transfer_seeds: Annotated[
        int, typer.Option(min=1, help="Transfer: seed images (9 examples each when targeted).")
    ] = 20,
    transfer_targeted: Annotated[
        bool, typer.Option("--transfer-targeted/--transfer-untargeted", help="Transfer: mode.")
    ] = True,
    transfer_eps: Annotated[
        str | None, typer.Option(help="Transfer: eps (default 0.5 targeted, 0.3 untargeted).")
    ] = None,
    transfer_norm: Annotated[str, typer.Option(help="Transfer: linf | l2.")] = "linf",
    transfer_noise_baseline: Annotated[
        bool, typer.Option(help="Transfer: also send same-size random noise (costs queries).")
    ] = True,
) -> None:
    """Select, extract and evaluate for each method and budget, then (unless --no-transfer)
    attack the target with PGD examples crafted on the last substitute; write a report.

    Every option is checked before the first label is bought. A 402 or 403 part-way keeps the
    labels bought, trains on them, reports ``stopped_by`` and ends the extraction runs."""
    from attacker.oracle import OracleError
    from attacker.report import write_report
    from attacker.selection.online import is_online
    from attacker.transfer import attach_to_run_report, make_attack
    from mlcore.checkpoints import save_checkpoint
    from mlcore.datasets import load_dataset

    methods, budgets = method or ["drmi"], sorted(k or [300])
    runs: list[dict[str, Any]] = []
    substitute = None
    try:  # every option, before any label is bought
        _check_url(url)
        keys = _accounts(api_key, api_keys, split, methods)
        api_key = keys[0]  # the transfer step's account
        if eval_api_key is not None:
            _check_key("--eval-api-key", eval_api_key)
            if eval_api_key in keys:
                raise ValueError("--eval-api-key must differ from --api-key (evaluation would "
                                 "spend the attack's budget and show in its query stream)")  # fmt: skip
        attack = make_attack(
            "pgd", targeted=transfer_targeted, eps=transfer_eps, norm=transfer_norm, seed=seed
        )
        if data_root is not None and not data_root.is_dir():
            raise ValueError(f"--data-root {str(data_root)!r} is not a folder")
        pool_set = load_dataset(pool, data_root=data_root)
        test_set = load_dataset(test, data_root=data_root)

        def selector_params(name: str) -> dict[str, Any]:
            return _selector_params(
                name, alpha=alpha, init=init, bins=bins, starts=starts, seed=seed
            )

        online_method = _online_builder(
            url,
            api_key,
            model,
            params=selector_params,
            rounds=rounds,
            seed_fraction=seed_fraction,
            seed=seed,
        )
        plan = _plan_runs(
            methods, budgets, pool_size=len(pool_set), params=selector_params, online=online_method
        )
        if semi_supervised and "jbda" in methods:
            raise ValueError("--semi-supervised needs a pool selector; jbda trains on synthetic "
                             "queries, not on the pool")  # fmt: skip
        _check_writable("--report-dir", report_dir, folder=True)
        _check_writable("--cache", cache)
        if shared_cache is not None:
            _check_writable("--shared-cache", shared_cache)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    try:
        labels = _target_labels(url, eval_api_key, model, cache, test_set)
        for method_name, budget, params in plan:
            common: dict[str, Any] = dict(
                url=url, api_key=api_key, model=model, test=test_set, arch=arch, seed=seed,
                cache=cache, shared_cache=shared_cache, target_labels=labels,
            )  # fmt: skip
            if params is None:  # JbDA synthesises its queries: no selection step
                result, record = _jbda_and_evaluate(pool=pool_set, k=budget, **common)
            elif is_online(method_name):  # buys while it chooses
                result, record = _online_and_evaluate(
                    pool=pool_set, online=online_method(method_name, budget), k=budget,
                    epochs=epochs, round_epochs=round_epochs, batch_size=batch_size,
                    semi_supervised=semi_supervised, **common,
                )  # fmt: skip
            elif api_keys is not None:  # Sybil: one selection, several accounts
                from attacker.sybil import sybil_and_evaluate

                _, selection, select_seconds = _select(pool, data_root, method_name, budget, params)
                result, record = sybil_and_evaluate(
                    lambda key: _oracle(url, key, model, cache, shared_cache=shared_cache), keys,
                    pool=pool_set, selection=selection, split=split, test=test_set, arch=arch,
                    epochs=epochs, batch_size=batch_size, seed=seed, target_labels=labels,
                    semi_supervised=semi_supervised,
                )  # fmt: skip
                record["select_seconds"] = round(select_seconds, 2)
            else:
                _, selection, select_seconds = _select(pool, data_root, method_name, budget, params)
                result, record = _extract_and_evaluate(
                    pool=pool_set, selection=selection, epochs=epochs, batch_size=batch_size,
                    semi_supervised=semi_supervised, **common,
                )  # fmt: skip
                record["select_seconds"] = round(select_seconds, 2)
            runs.append(record)
            substitute = result.substitute
            save_checkpoint(
                report_dir / f"substitute-{method_name}-k{budget}.pt",
                result.substitute,
                arch=arch,
                arch_kwargs=result.arch_kwargs,
                dataset=pool,
                metrics=record,
            )
            if result.stopped_by is not None:
                _warn_stopped(result.stopped_by, "trained on the labels bought; stopping here")
                break
    except (OracleError, ValueError, FileNotFoundError) as exc:
        if not runs:
            raise _fail(exc) from None
        console.print(f"[red]stopped:[/red] {exc}; reporting the runs finished so far")
    meta = {
        "url": url,
        "model": model,
        "pool": pool,
        "test": test,
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "semi_supervised": semi_supervised,
        "shared_cache": None if shared_cache is None else str(shared_cache),
        "accounts": len(keys),
    }
    path = write_report(report_dir, runs, meta)
    _print_runs(runs)
    summary: dict[str, Any] | None = None
    if transfer and substitute is not None:
        try:
            summary = _transfer_step(
                url=url, api_key=api_key, model=model, substitute=substitute, seed_set=test_set,
                attack=attack, targeted=transfer_targeted, seeds=transfer_seeds, seed=seed,
                noise_baseline=transfer_noise_baseline, cache=cache, shared_cache=shared_cache,
            )  # fmt: skip
        except (OracleError, ValueError) as exc:
            console.print(f"[red]transfer step failed:[/red] {exc}")
            summary = {"error": str(exc)}
    attach_to_run_report(report_dir, summary)
    if summary is not None and "error" not in summary:
        _print_transfer(summary)
    console.print(f"report -> {path} (and report.md)")


def _accounts(
    api_key: str | None, api_keys: Path | None, split: str, methods: list[str]
) -> list[str]:
    """The attack's API keys: --api-key, or (Sybil) the keys in the --api-keys file, which
    split the selection of a pool selector (not JbDA or an online method) --split ways."""
    from attacker.selection.online import is_online
    from attacker.sybil import SPLITS, read_api_keys

    if (api_key is None) == (api_keys is None):
        raise ValueError("give one of --api-key (one account) or --api-keys FILE (Sybil)")
    if api_key is not None:
        _check_key("--api-key", api_key)
        return [api_key]
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    unsplittable = [m for m in methods if m == "jbda" or is_online(m)]
    if unsplittable:
        raise ValueError(f"--api-keys splits a selection of the pool; {unsplittable[0]} buys "
                         "as it goes: use --api-key")  # fmt: skip
    return read_api_keys(api_keys)  # type: ignore[arg-type]


def _online_builder(
    url: str,
    api_key: str,
    model: str,
    *,
    params: Callable[[str], dict[str, Any]],
    rounds: int,
    seed_fraction: float,
    seed: int,
) -> Callable[[str, int], Any]:
    """``build(method, k)``: a fresh ``OnlineMethod``. The target's output policy is read (free)
    the first time a guided selector needs it."""
    from functools import cache

    from attacker.selection.online import ADAPTIVE_METHODS, build_online

    probabilities = cache(lambda: _target_probabilities(url, api_key, model))

    def build(method: str, k: int) -> Any:
        return build_online(
            method, k=k, selector_params=params(method), rounds=rounds,
            seed_fraction=seed_fraction, seed=seed,
            target_probabilities=method not in ADAPTIVE_METHODS and probabilities(),
        )  # fmt: skip

    return build


def _plan_runs(
    methods: list[str],
    budgets: list[int],
    *,
    pool_size: int,
    params: Callable[[str], dict[str, Any]],
    online: Callable[[str, int], Any] | None = None,
) -> list[tuple[str, int, dict[str, Any] | None]]:
    """(method, k, selector params, None for JbDA) for every run, each checked: the method is
    known, its parameters build a selector (or, for an online method, ``online(method, k)``
    builds it: its rounds fit k, its guide has a source), and k fits the method and the pool."""
    from attacker.selection import SELECTORS, make_selector
    from attacker.selection.online import ADAPTIVE_METHODS, is_online

    known = sorted([*SELECTORS, *ADAPTIVE_METHODS, "jbda"])
    plan: list[tuple[str, int, dict[str, Any] | None]] = []
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")
        chosen = None if name == "jbda" else params(name)
        if chosen is not None and name not in ADAPTIVE_METHODS:
            make_selector(name, **chosen)  # raises ValueError naming a bad parameter
        for budget in budgets:
            if name == "jbda" and budget < JBDA_SEED_SIZE:
                raise ValueError(
                    f"--k for jbda must be at least {JBDA_SEED_SIZE} (its seed images), got {budget}"
                )
            if name != "jbda" and not 1 <= budget <= pool_size:
                raise ValueError(
                    f"--k for {name} must be in 1..{pool_size} (the pool size), got {budget}"
                )
            if online is not None and is_online(name):
                online(name, budget)  # raises ValueError naming what cannot fit
            plan.append((name, budget, chosen))
    return plan


def _print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table(
        "method", "k", "bought", "paid", "replayed", "from cache", "stopped by",
        "substitute accuracy", "agreement with target",
    )  # fmt: skip
    for record in runs:
        agreement = (
            "n/a (no --eval-api-key)"
            if record["agreement"] is None
            else f"{record['agreement']:.2%}"
        )
        table.add_row(
            record["method"],
            str(record["k"]),
            str(record["queries_bought"]),
            str(record["queries_paid"]),
            str(record["queries_replayed"]),
            str(record["queries_from_cache"]),
            record["stopped_by"] or "-",
            f"{record['substitute_accuracy']:.2%}",
            agreement,
        )
    Console().print(table)


def _register_membership() -> None:
    from attacker.membership.command import membership

    app.command()(membership)


_register_membership()

if __name__ == "__main__":
    app()
