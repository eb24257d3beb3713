"""K-means and PCA + K-means on class probabilities (DRMI paper, 5.4.2, Table 12).

The pool's class-probability vectors (the guide) are clustered into k clusters with K-means
(L2, scikit-learn, k-means++ seeded by ``seed``), and from each cluster the image nearest its
centroid is taken; as every strategy of the paper, per class (k_c clusters of the class's
images, k split evenly: ``select_per_class``). PCA + K-means first projects all the vectors on
their principal components (the paper does not say how many: by default as many as keep 95% of
the variance). Probabilities are often identical for many images (a confident or
rounding target); K-means then leaves clusters empty, and each empty cluster takes the unchosen
image nearest its centroid instead, so the result always has k distinct images.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np

from attacker.selection.base import (
    GuideKind,
    SelectionResult,
    Selector,
    check_int,
    select_per_class,
)

__all__ = ["KMeansSelector", "PcaKMeansSelector", "nearest_to_centroids"]


class KMeansSelector(Selector):
    """The image nearest each of k K-means centroids of the class probabilities."""

    guide: ClassVar[GuideKind | None] = "probabilities"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = check_int("seed", seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        assert guide is not None  # Selector.__call__ checked it: guide = "probabilities"
        features = self.features(guide)

        def choose(_c: int, members: np.ndarray, k_c: int) -> tuple[np.ndarray, dict[str, Any]]:
            return nearest_to_centroids(features[members], k_c, seed=self.seed), {}

        return select_per_class(labels, k, choose)

    def features(self, probabilities: np.ndarray) -> np.ndarray:
        """What K-means clusters: the probabilities themselves."""
        return probabilities


class PcaKMeansSelector(KMeansSelector):
    """K-means on the principal components of the class probabilities.

    ``components``: an integer number of components, or a fraction in (0, 1) of the variance
    to keep (scikit-learn's rule).
    """

    def __init__(self, *, seed: int = 0, components: float = 0.95) -> None:
        super().__init__(seed=seed)
        if isinstance(components, bool) or not isinstance(
            components, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"components must be a number, got {components!r}")
        is_count = float(components).is_integer() and components >= 1
        if not is_count and not 0 < components < 1:
            raise ValueError(
                f"components must be an integer >= 1 or a variance fraction in (0, 1), "
                f"got {components!r}"
            )
        self.components: float = int(components) if is_count else float(components)

    @property
    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "components": self.components}

    def features(self, probabilities: np.ndarray) -> np.ndarray:
        limit = min(probabilities.shape)
        if isinstance(self.components, int) and self.components > limit:
            raise ValueError(
                f"components must be at most {limit} (min of pool size and classes), "
                f"got {self.components}"
            )
        if np.ptp(probabilities, axis=0).max() == 0:  # all rows equal: no variance to project
            return probabilities
        from sklearn.decomposition import PCA

        return PCA(n_components=self.components, svd_solver="full").fit_transform(probabilities)


def nearest_to_centroids(features: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Indices (in cluster order) of the row nearest each of k K-means centroids of
    ``features``; an empty cluster takes the unchosen row nearest its centroid."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # fewer distinct points than k: handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(features)
    centers, assigned = kmeans.cluster_centers_, kmeans.labels_
    distance = np.linalg.norm(features - centers[assigned], axis=1)
    order = np.lexsort((np.arange(len(features)), distance, assigned))
    first_of_cluster = order[np.r_[True, assigned[order][1:] != assigned[order][:-1]]]
    chosen = np.full(k, -1)
    chosen[assigned[first_of_cluster]] = first_of_cluster
    taken = np.zeros(len(features), dtype=bool)
    taken[first_of_cluster] = True
    for cluster in np.flatnonzero(chosen < 0):
        gap = np.linalg.norm(features - centers[cluster], axis=1)
        gap[taken] = np.inf
        chosen[cluster] = int(gap.argmin())
        taken[chosen[cluster]] = True
    return chosen
