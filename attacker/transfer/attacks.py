"""The attack a transfer step crafts with, from command-line options: ``make_attack`` checks every
option against the attack chosen (a PGD-only option given to C&W is an error, not ignored), so
``attacker transfer`` refuses a bad combination before it buys anything."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from mlcore.adversarial import IGSM, PGD, Attack, CarliniWagnerL2

__all__ = ["ATTACKS", "default_eps", "make_attack", "parse_eps"]

ATTACKS = ("pgd", "igsm", "cw")

# The DRMI paper's eps: targeted 0.5 (Table 8; its text also names 128/255), untargeted 0.3 (Table 9).
DEFAULT_EPS = {True: 0.5, False: 0.3}


def default_eps(targeted: bool) -> float:
    """The paper's eps: 0.5 for targeted examples, 0.3 for untargeted ones."""
    return DEFAULT_EPS[bool(targeted)]


def parse_eps(text: str) -> float:
    """'0.5', '128/255' -> float; errors name the value."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number or a fraction like 128/255, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"eps must be > 0, got {text}")
    return value


def make_attack(
    name: str = "pgd",
    *,
    targeted: bool,
    eps: str | None = None,
    norm: str | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    random_start: bool | None = None,
    early_stop: bool | None = None,
    seed: int = 0,
    kappa: float | None = None,
    binary_search_steps: int | None = None,
    learning_rate: float | None = None,
    initial_const: float | None = None,
) -> Attack:
    """The attack ``name`` with these options (None: the attack's default); raises ValueError
    naming an unknown attack, a bad value, an option the attack does not take, or a mode it does
    not run in (IGSM is untargeted, as the paper uses it)."""
    if name not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {name!r}")
    given: dict[str, Any] = {
        "eps": eps, "norm": norm, "steps": steps, "step_size": step_size,
        "random_start": random_start, "early_stop": early_stop, "kappa": kappa,
        "binary_search_steps": binary_search_steps, "learning_rate": learning_rate,
        "initial_const": initial_const,
    }  # fmt: skip
    takes = {
        "pgd": {"eps", "norm", "steps", "step_size", "random_start", "early_stop"},
        "igsm": {"eps", "steps", "step_size"},
        "cw": {"steps", "kappa", "binary_search_steps", "learning_rate", "initial_const"},
    }[name]
    stray = sorted(key for key, value in given.items() if value is not None and key not in takes)
    if name == "igsm" and norm == "linf":
        stray.remove("norm")
    if name == "cw" and norm == "l2":
        stray.remove("norm")
    if stray:
        options = ", ".join("--" + key.replace("_", "-") for key in stray)
        raise ValueError(f"{options}: not an option of --attack {name}")
    chosen = {key: value for key, value in given.items() if value is not None and key in takes}
    attack: Attack
    if name == "pgd":
        bound = default_eps(targeted) if eps is None else parse_eps(eps)
        chosen.update(eps=bound, seed=seed)
        attack = PGD(**chosen)
    elif name == "igsm":
        if eps is not None:
            chosen["eps"] = parse_eps(eps)
        attack = IGSM(**chosen)
    else:
        attack = CarliniWagnerL2(**chosen)
    attack.check_mode(targeted)
    return attack
