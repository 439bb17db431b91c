"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", 2018): within one class, a backdoor's rows activate the last hidden layer differently from the clean
rows, so two-means on the class's reduced activations splits them off as a small, well-separated cluster.

Per class the activations are reduced to `components` dimensions (PCA, or ICA as in the paper), split by 2-means,
and the smaller cluster is flagged when both of the paper's criteria hold: its relative size is at most
`max_relative_size` and the split's silhouette score is at least `min_silhouette` (a clean class splits too, but
into halves of similar size that overlap). On digits a clean class can split off a small, distinct writing style
too, so trainguard adds a check against the clean reference rows (`max_reference_ratio`, None to drop it): a poison
cluster holds almost no reference rows, a clean one about its share.

Rows are flagged a cluster at a time, so a source is judged by where its rows fall, not only by how many are
flagged: per flagged class, a hypergeometric test of the source's rows in the small cluster against the class's
other candidate rows, combined over classes by Fisher's method (`findings`' concentration p-value). A clean source
whose rows happen to fill a clean style's cluster is there in proportion to its rows; a backdoor's source is not. A
source that is a flagged class's only contributor gets no concentration evidence: its rows are still flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.findings import Findings, check_inputs, findings


@dataclass(frozen=True)
class ClusteringConfig:
    """Reduction, and the paper's two criteria for calling the smaller cluster poison. ICA's components are
    whitened, which lowers silhouettes: pair it with a lower `min_silhouette` (about 0.1).

    Attributes:
        reduction: `"pca"` (the default) or `"ica"` (the paper's).
        components: Dimensions each class's activations are reduced to (>= 1).
        max_relative_size: The largest share of its class the smaller cluster may hold to be flagged, in (0, 1).
        min_silhouette: The smallest silhouette score of the split that flags it.
        max_reference_ratio: The largest ratio of the reference rows' share in the smaller cluster to its share of
            all rows that flags it; None: no reference check.
        seed: Seeds the reduction and 2-means.

    Raises:
        DetectionInputError: An unknown reduction, components < 1, or `max_relative_size` outside (0, 1).
    """

    reduction: Literal["pca", "ica"] = "pca"
    components: int = 10
    max_relative_size: float = 0.35
    min_silhouette: float = 0.15
    max_reference_ratio: float | None = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reduction not in ("pca", "ica"):
            raise DetectionInputError(f"clustering: reduction must be 'pca' or 'ica', not {self.reduction!r}")
        if self.components < 1 or not 0 < self.max_relative_size < 1:
            raise DetectionInputError("clustering: components must be >= 1 and max_relative_size in (0, 1)")


@dataclass(frozen=True)
class ClassSplit:
    """One class's 2-means split: the rows of its smaller cluster, that cluster's relative size, the silhouette."""

    label: int
    rows: int
    small: np.ndarray
    relative_size: float
    silhouette: float

    def reference_ratio(self, is_reference: np.ndarray, members: np.ndarray) -> float:
        """The reference rows' share in the smaller cluster over its share of all rows (about 1 for a clean split;
        1 when the class has no reference rows, so the check cannot decide alone)."""
        references = int(is_reference[members].sum())
        if references == 0 or self.relative_size == 0:
            return 1.0
        return float(is_reference[self.small].sum()) / references / self.relative_size

    def poisoned(self, config: ClusteringConfig, reference_ratio: float) -> bool:
        paper = self.relative_size <= config.max_relative_size and self.silhouette >= config.min_silhouette
        return paper and (config.max_reference_ratio is None or reference_ratio <= config.max_reference_ratio)


def split_class(features: np.ndarray, label: int, members: np.ndarray, config: ClusteringConfig) -> ClassSplit:
    """Reduces one class's activations and splits them in two; classes too small to split keep one cluster."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.metrics import silhouette_score

    x = features[members].astype(np.float64)
    dims = min(config.components, x.shape[1], len(members) - 1)
    if dims < 1 or len(members) < 4 or np.allclose(x, x[0]):
        return ClassSplit(label, len(members), members[:0], 0.0, 0.0)
    if config.reduction == "ica":
        reducer = FastICA(dims, random_state=config.seed, whiten="unit-variance", max_iter=500)
    else:
        reducer = PCA(dims, random_state=config.seed)
    reduced = reducer.fit_transform(x - x.mean(axis=0))
    assignment = KMeans(2, n_init=10, random_state=config.seed).fit_predict(reduced)
    if len(np.unique(assignment)) < 2:
        return ClassSplit(label, len(members), members[:0], 0.0, 0.0)
    smaller = int(np.argmin(np.bincount(assignment, minlength=2)))
    small = members[assignment == smaller]
    silhouette = float(silhouette_score(reduced, assignment))
    return ClassSplit(label, len(members), small, len(small) / len(members), silhouette)


def class_splits(features: np.ndarray, labels: np.ndarray, config: ClusteringConfig) -> list[ClassSplit]:
    return [split_class(features, int(c), np.flatnonzero(labels == c), config) for c in np.unique(labels)]


def detect_clustering(
    features: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    config: ClusteringConfig = ClusteringConfig(),
    reference: str = "<reference>",
    alpha: float = 0.01,
) -> Findings:
    """Activation-clustering findings on the rows whose source is not `reference` (those calibrate). A row's score
    is its class's silhouette when it lies in the smaller cluster, else 0.

    Args:
        features: Penultimate-layer representations (N, D), finite.
        labels: Integer labels (N,).
        sources: Each row's source; rows of `reference` are clean and only calibrate.
        config: The detector's settings.
        reference: The source name that marks the clean reference rows.
        alpha: The false discovery rate the per-source decisions are held to.

    Returns:
        The `"clustering"` findings; a source's p-value is at least its concentration p-value among the flagged
        rows.

    Raises:
        DetectionInputError: Shapes that disagree, no reference or no candidate rows, or non-finite features.
    """
    labels = np.asarray(labels)
    is_reference = check_inputs(features, labels, sources, reference)
    scores = np.zeros(len(labels))
    flagged = np.zeros(len(labels), dtype=bool)
    poisoned = []
    for split in class_splits(features, labels, config):
        ratio = split.reference_ratio(is_reference, np.flatnonzero(labels == split.label))
        scores[split.small] = split.silhouette
        if split.poisoned(config, ratio):
            flagged[split.small] = True
            poisoned.append(split.label)
    concentration = concentration_p_values(flagged, labels, sources, is_reference, poisoned)
    return findings("clustering", scores, flagged, labels, sources, is_reference, alpha, concentration)


def concentration_p_values(
    flagged: np.ndarray, labels: np.ndarray, sources: Sequence[str], is_reference: np.ndarray, classes: Sequence[int]
) -> dict[str, float]:
    """Per candidate source, Fisher's combination over the flagged `classes` it has rows in of the hypergeometric
    P(at least its flagged count) when the class's flagged candidate rows were drawn at random from its candidate
    rows; 1 for a source with no such class."""
    from scipy.stats import hypergeom

    from trainguard.defenses.conformal import fisher

    names = np.asarray(sources, dtype=object)
    per_source: dict[str, list[float]] = {str(s): [] for s in np.unique(names[~is_reference])}
    for label in classes:
        members = (labels == label) & ~is_reference
        total, drawn = int(members.sum()), int((flagged & members).sum())
        for source in np.unique(names[members]):
            mine = members & (names == source)
            rows, hits = int(mine.sum()), int((flagged & mine).sum())
            p_value = float(hypergeom.sf(hits - 1, total, rows, drawn))
            per_source[str(source)].append(min(1.0, max(p_value, np.finfo(np.float64).tiny)))
    return {source: fisher(p) if p else 1.0 for source, p in per_source.items()}
