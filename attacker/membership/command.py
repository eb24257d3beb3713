"""``attacker membership``: play a membership challenge (registered in ``attacker/cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Url = Annotated[str, typer.Option(help="Target service URL.", envvar="ATTACKER_URL")]
ApiKey = Annotated[str, typer.Option(help="Your API key.", envvar="ATTACKER_API_KEY")]


def membership(
    url: Url,
    api_key: ApiKey,
    challenge: Annotated[str, typer.Option(help="The challenge id the admin gave you.")],
    attack: Annotated[
        str,
        typer.Option(help="threshold | shadow | lira (need probabilities) | gap | augmentation"),
    ] = "threshold",
    report_dir: Annotated[Path, typer.Option(help="Where membership.json and roc.png go.")] = Path(
        "reports/membership"
    ),
    shadows: Annotated[int | None, typer.Option(help="shadow / lira: shadow models.")] = None,
    shadow_size: Annotated[
        int | None, typer.Option(help="shadow / lira: images per shadow (default half the pool).")
    ] = None,
    shadow_arch: Annotated[str | None, typer.Option(help="shadow / lira: architecture.")] = None,
    shadow_epochs: Annotated[int | None, typer.Option(help="shadow / lira: epochs.")] = None,
    pool: Annotated[
        str | None, typer.Option(help="shadow / lira: the attacker's own data, name:split.")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="Root of full datasets.")] = None,
    shift: Annotated[
        int | None, typer.Option(help="augmentation: largest shift in pixels (N = (2s+1)^2).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="augmentation: also mirrored copies (N x 2).")] = False,
    seed: Annotated[int | None, typer.Option(help="shadow / lira: seed.")] = None,
) -> None:
    """Play a membership challenge: read the candidates, run the attack within the budget,
    submit one score per candidate, and write membership.json and roc.png."""
    from attacker.cli import _check_key, _check_url, _fail, _progress, console
    from attacker.membership.challenge import FIGURES, play_challenge
    from attacker.oracle import OracleError
    from mlcore.client import ServiceError

    options = {
        "shadows": shadows, "size": shadow_size, "arch": shadow_arch, "epochs": shadow_epochs,
        "pool": pool, "data_root": data_root, "seed": seed, "shift": shift, "flip": flip or None,
    }  # fmt: skip
    # only the options given: one the attack does not take is named by make_attack
    params: dict[str, Any] = {key: value for key, value in options.items() if value is not None}
    try:
        _check_url(url)
        _check_key("--api-key", api_key)
        with _progress() as progress:
            task = progress.add_task(f"{attack}: buying answers", total=None)
            report = play_challenge(
                url,
                api_key,
                challenge,
                attack,
                params,
                report_dir,
                on_batch=lambda n: progress.advance(task, n),
            )
    except (ValueError, OracleError, ServiceError) as exc:
        raise _fail(exc) from None
    figures = ", ".join(f"{key} {report[key]:.4f}" for key in FIGURES)
    console.print(
        f"{attack} on {report['model']}: {figures}; queries paid {report['queries_paid']} "
        f"-> {report_dir / 'membership.json'}"
    )
