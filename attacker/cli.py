"""``attacker``: select queries, buy labels, train a substitute, and report.

attacker select  --method drmi --pool mnist-embedded:pool --k 300 -o drmi300.json
attacker extract --url URL --api-key KEY --model lenet5-mnist --selection drmi300.json -o sub.pt
attacker transfer --url URL --api-key KEY --model lenet5-mnist --substitute sub.pt --targeted \
                  --eps 0.5 --seeds 500 --report-dir r/
attacker run     --url URL --api-key KEY --model lenet5-mnist --method drmi --k 300 --report-dir r/
"""

from __future__ import annotations

import logging
import time
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
CachePath = Annotated[Path, typer.Option(help="Answer cache: a re-run never re-buys a label.")]
Norm = Annotated[str, typer.Option(help="PGD norm: linf | l2.")]
Steps = Annotated[int, typer.Option(min=1, help="PGD iterations.")]


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
    return {"seed": seed}


def _select(pool_spec: str, data_root: Path | None, method: str, k: int, params: dict[str, Any]):
    from attacker.selection import Selection, make_selector
    from mlcore.datasets import load_dataset

    pool = load_dataset(pool_spec, data_root=data_root)
    selector = make_selector(method, **params)  # DRMI reports its progress through logging
    started = time.perf_counter()
    result = selector(pool.images.numpy(), pool.labels.numpy(), k=k)
    seconds = time.perf_counter() - started
    return (
        pool,
        Selection.from_result(result, pool=pool_spec, method=method, params=params),
        seconds,
    )


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=2)


@app.command()
def select(
    method: Annotated[str, typer.Option(help="drmi | random")] = "drmi",
    pool: Pool = "mnist-embedded:pool",
    k: Annotated[int, typer.Option(help="How many queries to select.")] = 300,
    alpha: Annotated[float, typer.Option(help="DRMI: I = MI^alpha.")] = 2.0,
    init: Annotated[str, typer.Option(help="DRMI: min-sum | min-max.")] = "min-sum",
    bins: Annotated[
        int, typer.Option(help="DRMI: histogram bins (256 = one per intensity).")
    ] = 256,
    starts: Annotated[
        int | None, typer.Option(help="DRMI: start vertices (default all: exact).")
    ] = None,
    seed: Seed = 0,
    data_root: DataRoot = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("selection.json"),
) -> None:
    """Choose which pool images to buy labels for, and save the choice as JSON."""
    try:
        params = _selector_params(
            method, alpha=alpha, init=init, bins=bins, starts=starts, seed=seed
        )
        _, selection, seconds = _select(pool, data_root, method, k, params)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    selection.save(output)
    console.print(f"selected {selection.k} of {pool} with {method} in {seconds:.1f} s -> {output}")


def _oracle(
    url: str,
    api_key: str,
    model: str,
    cache: Path,
    progress: Progress | None = None,
    total: int = 0,
):
    from attacker.oracle import HttpOracle

    on_batch = None
    if progress is not None:
        task = progress.add_task(f"buying labels from {model}", total=total)

        def on_batch(n: int) -> None:
            progress.advance(task, n)

    return HttpOracle(url, api_key, model, cache_path=cache, on_batch=on_batch)


def _target_labels(
    url: str, eval_key: str | None, model: str, cache: Path, test
) -> np.ndarray | None:
    """The target's labels on the test set, bought with the separate evaluation key."""
    if eval_key is None:
        return None
    with _oracle(url, eval_key, model, cache) as oracle:
        return oracle.predict_labels(test.images.numpy())


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
    target_labels: np.ndarray | None,
) -> tuple[Any, dict[str, Any]]:
    from attacker.extraction import evaluate_substitute, extract

    indices = np.asarray(selection.indices)
    with (
        _progress() as progress,
        _oracle(url, api_key, model, cache, progress, total=len(indices)) as oracle,
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
            progress=on_epoch,
        )
        paid = oracle.queries_bought
    run = {
        "method": selection.method,
        "params": selection.params,
        "k": selection.k,
        "queries_bought": result.queries_bought,
        "queries_paid": paid,
        "budget_exhausted": result.budget_exhausted,
        **evaluate_substitute(result.substitute, test, target_labels=target_labels),
        "train_seconds": round(result.train_seconds, 2),
        "seed": seed,
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
    target_labels: np.ndarray | None,
) -> tuple[Any, dict[str, Any]]:
    """JbDA spends ``k`` queries on synthetic points (its own schedule: 100 seeds, lambda 0.1,
    sign flip after 3 rounds, 10 epochs per round)."""
    from attacker.extraction import evaluate_substitute
    from attacker.jbda import jbda_extract

    with _progress() as progress, _oracle(url, api_key, model, cache, progress, total=k) as oracle:
        result = jbda_extract(oracle, pool, k=k, arch=arch, seed=seed)
        paid = oracle.queries_bought
    run = {
        "method": "jbda",
        "params": {"seed_size": 100, "lambda": 0.1, "tau": 3, "epochs_per_round": 10},
        "k": k,
        "queries_bought": result.queries_bought,
        "queries_paid": paid,
        "budget_exhausted": result.budget_exhausted,
        "blocked": result.blocked,
        **evaluate_substitute(result.substitute, test, target_labels=target_labels),
        "train_seconds": round(result.train_seconds, 2),
        "seed": seed,
    }
    return result, run


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
    near-duplicates (a defence must not flag this client)."""
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
    with HttpOracle(url, api_key, model, batch_size=request_size) as oracle:  # no cache: re-send
        try:
            answers = oracle.predict_labels(x)
        except (Blocked, BudgetExhausted) as exc:
            answers, outcome, blocked = exc.labels, f"stopped: {exc}", isinstance(exc, Blocked)
        except OracleError as exc:
            raise _fail(exc) from None
    answered = answers >= 0
    console.print(
        f"benign client sent {int(answered.sum())} of {queries} queries "
        f"({int(stream.repeated.sum())} repeats); {outcome}; the target's answers were right on "
        f"{(answers[answered] == truth[answered]).mean():.2%} of them"
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
    arch: Arch = "lenet5",
    epochs: Epochs = 30,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    test: TestSet = "mnist-embedded:test",
    data_root: DataRoot = None,
    eval_api_key: EvalKey = None,
    cache: CachePath = DEFAULT_CACHE,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("substitute.pt"),
) -> None:
    """Buy the selected labels and train a substitute; save it as a checkpoint."""
    from attacker.oracle import OracleError
    from attacker.selection import Selection
    from mlcore.checkpoints import save_checkpoint
    from mlcore.datasets import load_dataset

    try:
        selection = Selection.load(selection_path)
        pool = load_dataset(selection.pool, data_root=data_root)
        test_set = load_dataset(test, data_root=data_root)
        labels = _target_labels(url, eval_api_key, model, cache, test_set)
        result, run = _extract_and_evaluate(
            url=url, api_key=api_key, model=model, pool=pool, selection=selection, test=test_set, arch=arch,
            epochs=epochs, batch_size=batch_size, seed=seed, cache=cache, target_labels=labels,
        )  # fmt: skip
    except (OracleError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    save_checkpoint(
        output,
        result.substitute,
        arch=arch,
        arch_kwargs=result.arch_kwargs,
        dataset=selection.pool,
        metrics=run,
    )
    _print_runs([run])
    console.print(f"substitute -> {output}")


def _make_attack(
    *,
    targeted: bool,
    eps: str | None,
    norm: str,
    steps: int,
    step_size: float | None,
    random_start: bool,
    early_stop: bool,
    seed: int,
):
    """The PGD attack the options describe; raises ValueError naming a bad value."""
    from attacker.transfer import PGD, default_eps, parse_eps

    bound = default_eps(targeted) if eps is None else parse_eps(eps)
    return PGD(
        norm=norm,
        eps=bound,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        early_stop=early_stop,
        seed=seed,
    )


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
) -> dict[str, Any]:
    """Craft on the substitute, send what fools it to the target; returns the summary."""
    from attacker.transfer import transfer_attack

    with _progress() as progress, _oracle(url, api_key, model, cache) as oracle:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        result = transfer_attack(
            oracle,
            substitute,
            seed_set,
            attack=attack,
            targeted=targeted,
            seeds=seeds,
            seed=seed,
            noise_baseline=noise_baseline,
            progress=on_progress,
        )
    summary = result.summary()
    summary.update(url=url, model=model)
    return summary


def _print_transfer(summary: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2%}"

    mode = "targeted" if summary["targeted"] else "untargeted"
    table = Table(
        "attack", "crafted", "fooled substitute", "sent", "fooled target", "transferability",
        "noise baseline", "queries (examples + noise)",
    )  # fmt: skip
    table.add_row(
        f"{mode} PGD {summary['norm']} eps {summary['eps']:.3g}",
        str(summary["crafted"]),
        str(summary["fooled_substitute"]),
        str(summary["sent"]),
        str(summary["fooled_target"]),
        pct(summary["transferability"]),
        pct(summary["noise_baseline"]),
        f"{summary['sent']} + {summary['noise_queries']}",
    )
    Console().print(table)
    if summary["budget_exhausted"] or summary["blocked"]:
        why = "budget exhausted" if summary["budget_exhausted"] else "blocked by the service"
        console.print(f"[yellow]{why}: figures cover what was sent before that[/yellow]")


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
    norm: Norm = "linf",
    steps: Steps = 40,
    step_size: Annotated[
        float | None, typer.Option(help="PGD step (default 2.5 * eps / steps).")
    ] = None,
    random_start: Annotated[bool, typer.Option(help="Start PGD at a random point.")] = True,
    early_stop: Annotated[
        bool, typer.Option(help="Stop moving an example once it fools the substitute.")
    ] = False,
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
    cache: CachePath = DEFAULT_CACHE,
    report_dir: Annotated[
        Path, typer.Option(help="Where transfer.json / transfer.md / plots go.")
    ] = Path("reports"),
) -> None:
    """Craft PGD examples on the substitute and send those that fool it to the target."""
    from attacker.oracle import OracleError
    from attacker.transfer import write_transfer_report
    from mlcore.checkpoints import CheckpointError, load_checkpoint
    from mlcore.datasets import load_dataset

    try:
        attack = _make_attack(
            targeted=targeted, eps=eps, norm=norm, steps=steps, step_size=step_size,
            random_start=random_start, early_stop=early_stop, seed=seed,
        )  # fmt: skip
        checkpoint = load_checkpoint(substitute)
        seed_set = load_dataset(test, data_root=data_root)
        summary = _transfer_step(
            url=url, api_key=api_key, model=model, substitute=checkpoint.model, seed_set=seed_set,
            attack=attack, targeted=targeted, seeds=seeds, seed=seed,
            noise_baseline=noise_baseline, cache=cache,
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
    api_key: ApiKey,
    model: Model = "lenet5-mnist",
    method: Annotated[
        list[str] | None, typer.Option(help="Method(s): drmi, random, jbda (Papernot et al.).")
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
    arch: Arch = "lenet5",
    epochs: Epochs = 30,
    batch_size: BatchSize = 4,
    seed: Seed = 0,
    data_root: DataRoot = None,
    eval_api_key: EvalKey = None,
    cache: CachePath = DEFAULT_CACHE,
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
    attack the target with PGD examples crafted on the last substitute; write a report."""
    from attacker.oracle import OracleError
    from attacker.report import write_report
    from attacker.transfer import attach_to_run_report
    from mlcore.checkpoints import save_checkpoint
    from mlcore.datasets import load_dataset

    methods, budgets = method or ["drmi"], sorted(k or [300])
    runs: list[dict[str, Any]] = []
    substitute = None
    try:  # a bad transfer option must fail before any label is bought
        attack = _make_attack(
            targeted=transfer_targeted, eps=transfer_eps, norm=transfer_norm, steps=40,
            step_size=None, random_start=True, early_stop=False, seed=seed,
        )  # fmt: skip
    except ValueError as exc:
        raise _fail(exc) from None
    try:
        test_set = load_dataset(test, data_root=data_root)
        labels = _target_labels(url, eval_api_key, model, cache, test_set)
        for method_name in methods:
            for budget in budgets:
                if method_name == "jbda":  # synthesises its queries: no selection step
                    result, record = _jbda_and_evaluate(
                        url=url, api_key=api_key, model=model, pool=load_dataset(pool, data_root=data_root),
                        k=budget, test=test_set, arch=arch, seed=seed, cache=cache, target_labels=labels,
                    )  # fmt: skip
                else:
                    params = _selector_params(
                        method_name, alpha=alpha, init=init, bins=bins, starts=starts, seed=seed
                    )
                    pool_set, selection, select_seconds = _select(
                        pool, data_root, method_name, budget, params
                    )
                    result, record = _extract_and_evaluate(
                        url=url, api_key=api_key, model=model, pool=pool_set, selection=selection, test=test_set,
                        arch=arch, epochs=epochs, batch_size=batch_size, seed=seed, cache=cache, target_labels=labels,
                    )  # fmt: skip
                    record["select_seconds"] = round(select_seconds, 2)
                runs.append(record)
                substitute = result.substitute
                name = f"substitute-{method_name}-k{budget}.pt"
                save_checkpoint(
                    report_dir / name,
                    result.substitute,
                    arch=arch,
                    arch_kwargs=result.arch_kwargs,
                    dataset=pool,
                    metrics=record,
                )
                if result.budget_exhausted or result.blocked:
                    why = "blocked by the service" if result.blocked else "budget exhausted"
                    console.print(f"[yellow]{why}: stopping here[/yellow]")
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
    }
    path = write_report(report_dir, runs, meta)
    _print_runs(runs)
    summary: dict[str, Any] | None = None
    if transfer and substitute is not None:
        try:
            summary = _transfer_step(
                url=url, api_key=api_key, model=model, substitute=substitute, seed_set=test_set,
                attack=attack, targeted=transfer_targeted, seeds=transfer_seeds, seed=seed,
                noise_baseline=transfer_noise_baseline, cache=cache,
            )  # fmt: skip
        except (OracleError, ValueError) as exc:
            console.print(f"[red]transfer step failed:[/red] {exc}")
            summary = {"error": str(exc)}
    attach_to_run_report(report_dir, summary)
    if summary is not None and "error" not in summary:
        _print_transfer(summary)
    console.print(f"report -> {path} (and report.md)")


def _print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table("method", "k", "bought", "paid", "substitute accuracy", "agreement with target")
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
            f"{record['substitute_accuracy']:.2%}",
            agreement,
        )
    Console().print(table)


if __name__ == "__main__":
    app()
