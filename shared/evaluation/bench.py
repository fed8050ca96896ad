"""Benchmark several models' features of the same samples side by side: linear probe, retrieval and agreement.

Each model is scored with :func:`run_linear_probe` and :func:`run_retrieval` on the same folds. Each
model other than the reference is also compared with the reference on all samples, with no
projector between the two spaces:

- ``linear_cka``: linear centred kernel alignment of the two feature matrices;
- ``knn_overlap@k``: the mean fraction of a sample's k nearest neighbours shared by both spaces;
- ``nn_label_agreement``: how often the model's nearest neighbour of a sample has the label of the
  reference's nearest neighbour, right or wrong.

Agreement intervals always come from a bootstrap of all samples, because agreement needs no fold.
For the k-NN metrics the per-sample values are resampled rather than the rows, since a repeated row
would be its own nearest neighbour. Given the case of each sample, every bootstrap (agreement, and
the test set with one fold) draws cases and takes all their samples, because tiles or slides of one
case are correlated. Without it the samples are drawn one by one. numpy and scikit-learn only, no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.agreement import knn_overlap_chance, knn_overlap_per_tile, linear_cka, nearest_neighbours
from shared.errors import ConfigError
from shared.evaluation.bench_inputs import FeatureSet
from shared.evaluation.bootstrap import BOOTSTRAP_RESAMPLES, MetricSummary, bootstrap_resample_metrics, summarize_bootstrap
from shared.evaluation.folds import Fold
from shared.evaluation.protocols import ProtocolResult, run_linear_probe, run_retrieval
from shared.evaluation.retrieval import DEFAULT_KS, METRICS

logger = logging.getLogger(__name__)

AGREEMENT_METRICS = ("linear_cka", "knn_overlap", "nn_label_agreement")


@dataclass(frozen=True)
class BenchOptions:
    """Settings of a benchmark run; the defaults follow Patho-Bench's linear-probe and retrieval protocols.

    ``reference`` is the model the others are compared with (None: the first feature set).
    ``agreement_metric`` ranks neighbours for the k-NN agreement metrics, and ``knn_k`` is their k,
    lowered to N - 1 for fewer samples.
    """

    cost: float = 1.0
    balanced: bool = True
    retrieval_metrics: tuple[str, ...] = METRICS
    ks: tuple[int, ...] = DEFAULT_KS
    reference: str | None = None
    agreement_metric: str = "cosine"
    knn_k: int = 10
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = 0


@dataclass(frozen=True)
class ModelResult:
    """One model's feature set and its protocol results, keyed by protocol name (``linear_probe``, ``retrieval_l2`` ...)."""

    feature_set: FeatureSet
    protocols: dict[str, ProtocolResult]

    @property
    def name(self) -> str:
        return self.feature_set.name

    @property
    def dimension(self) -> int:
        return int(self.feature_set.features.shape[1])

    def metrics(self) -> dict[str, MetricSummary]:
        """Return every metric summary keyed ``PROTOCOL.METRIC``, for example ``linear_probe.balanced_accuracy``."""
        return {f"{protocol}.{name}": summary for protocol, result in self.protocols.items() for name, summary in result.summary.items()}


@dataclass(frozen=True)
class AgreementResult:
    """Agreement of ``model`` with ``reference``, keyed as in :data:`AGREEMENT_METRICS` with ``@k`` on ``knn_overlap``."""

    model: str
    reference: str
    metrics: dict[str, MetricSummary]
    knn_k: int
    knn_chance: float


@dataclass(frozen=True)
class BenchResult:
    """Everything :func:`shared.evaluation.report.write_report` needs: results, labels, folds and options.

    ``task`` describes the inputs for the report (level, labels file, where the folds came from) as
    name -> text, and is empty when the caller gave no description. ``groups`` is the case of each
    sample that the bootstraps resampled, or None when they resampled samples.
    """

    models: list[ModelResult]
    agreement: list[AgreementResult]
    reference: str
    labels: np.ndarray
    folds: list[Fold]
    options: BenchOptions
    task: dict[str, str] = field(default_factory=dict)
    groups: np.ndarray | None = None

    @property
    def interval_method(self) -> str:
        """``bootstrap`` for one fold, ``folds`` for several."""
        return "bootstrap" if len(self.folds) == 1 else "folds"

    @property
    def bootstrap_unit(self) -> str:
        """What the bootstraps draw with replacement: ``case`` when ``groups`` was given, else ``sample``."""
        return "sample" if self.groups is None else "case"


def run_bench(
    feature_sets: Sequence[FeatureSet],
    labels: Sequence,
    folds: Sequence[Fold],
    options: BenchOptions = BenchOptions(),
    *,
    groups: Sequence | None = None,
) -> BenchResult:
    """Score every feature set with the linear probe and retrieval on ``folds``, and compare each with the reference.

    Row ``i`` of every feature set, ``labels[i]`` and ``groups[i]`` describe the same sample.
    ``groups`` is the case of each sample (for a tile-level task, the case or slide of each tile), and
    makes every bootstrap draw whole cases. Without it the bootstraps draw samples, which gives too
    narrow intervals when samples of one case are correlated. Raises :class:`ConfigError` for fewer
    than 2 feature sets, repeated names, an unknown reference, or a feature set or groups whose row
    count differs from the labels.
    """
    labels = np.asarray(labels)
    reference = _check_inputs(feature_sets, labels, folds, options)
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if groups.shape != labels.shape:
            raise ConfigError(
                f"bench: groups have shape {groups.shape}, expected one case id per labelled sample, {labels.shape}.",
                value=list(groups.shape),
                limit=len(labels),
            )

    models = []
    for feature_set in feature_sets:
        resampling = {"bootstrap_resamples": options.bootstrap_resamples, "seed": options.seed, "groups": groups}
        protocols = {"linear_probe": run_linear_probe(feature_set.features, labels, folds, cost=options.cost, balanced=options.balanced, **resampling)}
        for metric in options.retrieval_metrics:
            protocols[f"retrieval_{metric}"] = run_retrieval(feature_set.features, labels, folds, metric=metric, ks=options.ks, **resampling)
        models.append(ModelResult(feature_set=feature_set, protocols=protocols))
        logger.info("benchmarked %s: balanced accuracy %.3f", feature_set.name, protocols["linear_probe"].summary["balanced_accuracy"].mean)

    reference_set = next(feature_set for feature_set in feature_sets if feature_set.name == reference)
    agreement = [
        compare_with_reference(feature_set, reference_set, labels, options, groups=groups)
        for feature_set in feature_sets
        if feature_set.name != reference
    ]
    return BenchResult(models=models, agreement=agreement, reference=reference, labels=labels, folds=list(folds), options=options, groups=groups)


def compare_with_reference(
    feature_set: FeatureSet,
    reference: FeatureSet,
    labels: np.ndarray,
    options: BenchOptions,
    *,
    groups: Sequence | None = None,
) -> AgreementResult:
    """Return the agreement metrics of ``feature_set`` with ``reference`` on all samples, with bootstrap intervals.

    With ``groups`` (the case of each sample) the bootstrap draws cases. The k-NN searches run once, in
    O(N^2 D) time. CKA is recomputed on every resample, in O(N D^2) time each, so many tiles of wide
    features make the CKA interval the slow part.
    """
    x = reference.features
    y = feature_set.features
    count = len(x)
    k = min(options.knn_k, count - 1)
    if k < 1:
        raise ConfigError(f"agreement: {count} samples, expected at least 2 to find a nearest neighbour.", value=count, limit=2)

    overlap = knn_overlap_per_tile(x, y, k=k, metric=options.agreement_metric)
    reference_neighbour = labels[nearest_neighbours(x, k=1, metric=options.agreement_metric)[:, 0]]
    model_neighbour = labels[nearest_neighbours(y, k=1, metric=options.agreement_metric)[:, 0]]
    label_agreement = (reference_neighbour == model_neighbour).astype(np.float64)

    knn_name = f"knn_overlap@{k}"

    def compute(rows: np.ndarray) -> dict[str, float]:
        return {"linear_cka": linear_cka(x[rows], y[rows]), knn_name: overlap[rows].mean(), "nn_label_agreement": label_agreement[rows].mean()}

    estimates = compute(np.arange(count))
    resampled = bootstrap_resample_metrics(compute, count, n=options.bootstrap_resamples, seed=options.seed, groups=groups)
    return AgreementResult(
        model=feature_set.name,
        reference=reference.name,
        metrics=summarize_bootstrap(estimates, resampled),
        knn_k=k,
        knn_chance=knn_overlap_chance(count, k),
    )


def _check_inputs(feature_sets: Sequence[FeatureSet], labels: np.ndarray, folds: Sequence[Fold], options: BenchOptions) -> str:
    """Validate the inputs of :func:`run_bench` and return the reference model's name."""
    names = [feature_set.name for feature_set in feature_sets]
    if len(names) < 2:
        raise ConfigError(f"bench: {len(names)} feature set ({names}), expected at least 2 models to compare. Pass another --features NAME=DIR.", value=names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"bench: model names {repeated} are used twice. Give each feature set its own name.", value=repeated)
    reference = options.reference if options.reference is not None else names[0]
    if reference not in names:
        raise ConfigError(f"bench: reference {reference!r} is not one of the models {names}. Pass one of them to --reference.", value=reference, limit=names)
    if labels.ndim != 1:
        raise ConfigError(f"bench: labels have shape {labels.shape}, expected one label per sample.", value=list(labels.shape))
    for feature_set in feature_sets:
        shape = np.shape(feature_set.features)
        if len(shape) != 2 or shape[0] != len(labels):
            raise ConfigError(
                f"bench: model {feature_set.name!r} has features of shape {shape}, expected ({len(labels)}, D): one row per labelled sample, in label order.",
                value=list(shape),
                limit=len(labels),
            )
    if not folds:
        raise ConfigError("bench: no folds. Read them from a split file or make them with make_folds.", value=0)
    return reference
