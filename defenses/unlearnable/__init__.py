"""Unlearnable examples: noise a data owner adds so that models trained on the data learn little.

Every method is ``fn(images, labels, *, eps, seed, progress=None, resume_path=None, **options)
-> ProtectionResult``, registered by name in ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable

from defenses.unlearnable.clusters import unlearnable_clusters
from defenses.unlearnable.mi_ue import mi_ue

METHODS: dict[str, Callable] = {}
METHODS["mi-ue"] = mi_ue
METHODS["uc"] = unlearnable_clusters
