"""The membership-inference attacks by name: ``make_attack(name, **params)``."""

from __future__ import annotations

from typing import Any

from attacker.membership.base import MembershipAttack, check_affordable
from attacker.membership.label_only import AugmentationAttack, GapAttack
from attacker.membership.lira import LiraOfflineAttack
from attacker.membership.shadow import ShadowModelAttack, ShadowSettings
from attacker.membership.threshold import ThresholdAttack

ATTACKS: dict[str, type[MembershipAttack]] = {
    attack.name: attack
    for attack in (ThresholdAttack, ShadowModelAttack, LiraOfflineAttack, GapAttack, AugmentationAttack)
}
SHADOW_ATTACKS = (ShadowModelAttack, LiraOfflineAttack)


def make_attack(name: str, **params: Any) -> MembershipAttack:
    """The attack ``name`` with ``params``; shadow settings (``pool``, ``shadows``, ``arch``,
    ``epochs``, ``batch_size``, ``seed``, ``decimals``, ``data_root``) go into its
    ``ShadowSettings``. ValueError names an unknown attack or parameter."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    if cls in SHADOW_ATTACKS:
        shadow_fields = set(ShadowSettings.__dataclass_fields__)
        shadow = {key: params.pop(key) for key in list(params) if key in shadow_fields}
        if shadow:
            default = cls.__dataclass_fields__["shadow"].default_factory()  # type: ignore[misc]
            params["shadow"] = ShadowSettings(**{**vars(default), **shadow})
    try:
        return cls(**params)
    except TypeError:
        known = sorted(
            set(cls.__dataclass_fields__) - {"shadow"}
            | (set(ShadowSettings.__dataclass_fields__) if cls in SHADOW_ATTACKS else set())
        )
        raise ValueError(
            f"unknown parameter for the {name} attack in {sorted(params)}; known: {known}"
        ) from None
