"""Dataset condensation (seed 002): a small synthetic training set learnt from a real one, by
gradient matching (DC, ``dc.py``) or distribution matching (DM, ``dm.py``); ``evaluation.py``
trains fresh models on a condensed set and measures their test accuracy."""

from defenses.condensation.common import (
    INITS,
    METHODS,
    CondensationConfig,
    CondensationError,
    load_npz,
    save_grid,
    save_npz,
)
from defenses.condensation.condense import CondensedSet, condense, matching_loss

__all__ = [
    "INITS",
    "METHODS",
    "CondensationConfig",
    "CondensationError",
    "CondensedSet",
    "condense",
    "load_npz",
    "matching_loss",
    "save_grid",
    "save_npz",
]
