"""The membership-inference attacks by name: ``make_attack(name, **params)``."""

from __future__ import annotations

import dataclasses
from typing import Any

from attacker.membership.base import MembershipAttack
from attacker.membership.label_only import AugmentationAttack, GapAttack
from attacker.membership.lira import LiraOfflineAttack
from attacker.membership.shadow import ShadowModelAttack, ShadowSettings
from attacker.membership.threshold import ThresholdAttack

ATTACKS: dict[str, type[MembershipAttack]] = {
    attack.name: attack
    for attack in (
        ThresholdAttack,
        ShadowModelAttack,
        LiraOfflineAttack,
        GapAttack,
        AugmentationAttack,
    )
}
SHADOW_ATTACKS = (ShadowModelAttack, LiraOfflineAttack)


def make_attack(name: str, **params: Any) -> MembershipAttack:
    """The attack ``name`` with ``params``; for the shadow and LiRA attacks, the fields of
    ``ShadowSettings`` (``pool``, ``shadows``, ``size``, ``arch``, ``epochs``, ``batch_size``,
    ``seed``, ``decimals``, ``data_root``) override its default shadow settings. ValueError
    names an unknown attack or parameter."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    own = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    shadow_fields = {field.name for field in dataclasses.fields(ShadowSettings)}
    known = own - {"shadow"} | (shadow_fields if "shadow" in own else set())
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"unknown parameter for the {name} attack: {unknown}; known: {sorted(known)}"
        )
    shadow = {key: params.pop(key) for key in list(params) if key in shadow_fields - own}
    if shadow:
        default: ShadowSettings = cls().shadow  # type: ignore[attr-defined]
        params["shadow"] = dataclasses.replace(default, **shadow)
    return cls(**params)
