"""Linear probe: logistic regression on raw, frozen features, as in Patho-Bench's linear-probe protocol.

The model is scikit-learn's ``LogisticRegression(C=cost, max_iter=10000, class_weight='balanced' or None)``
fitted on the train samples of a fold, with no feature scaling, so two encoders are compared on exactly
the features they output. The metrics on the test samples are balanced accuracy (the headline), macro
one-vs-rest ROC AUC and weighted F1.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

PROBE_METRICS = ("balanced_accuracy", "macro_auc", "weighted_f1")
MAX_ITER = 10000


@dataclass(frozen=True)
class ProbeResult:
    """Test-set predictions of a fitted probe and its metrics, one entry per name in :data:`PROBE_METRICS`."""

    metrics: dict[str, float]
    classes: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, *, cost: float = 1.0, balanced: bool = True) -> LogisticRegression:
    """Fit ``LogisticRegression(C=cost, max_iter=10000, class_weight='balanced' if balanced else None)`` on raw features.

    ``cost`` is the inverse of the L2 regularisation strength. A fit that does not converge within
    10000 iterations is kept and logged as a warning. Raises :class:`ConfigError` for fewer than 2
    classes or a non-positive cost.
    """
    features, labels = _check_samples(features, labels, "train")
    if not cost > 0:
        raise ConfigError(f"linear probe: cost is {cost}, expected a positive inverse regularisation strength, such as 1.0.", value=cost)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ConfigError(
            f"linear probe: the train samples have {len(classes)} class ({classes.tolist()}), expected at least 2. "
            "Check the labels and the folds.",
            value=classes.tolist(),
        )

    model = LogisticRegression(C=cost, max_iter=MAX_ITER, class_weight="balanced" if balanced else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, labels)
    if any(issubclass(warning.category, ConvergenceWarning) for warning in caught):
        logger.warning("linear probe did not converge in %d iterations (cost %s, %d samples)", MAX_ITER, cost, len(labels))
    return model


def evaluate_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    cost: float = 1.0,
    balanced: bool = True,
) -> ProbeResult:
    """Fit a probe on the train samples and return its predictions and metrics on the test samples.

    Raises :class:`ConfigError` when a test label never occurs in the train samples, because the probe
    cannot predict it.
    """
    model = fit_linear_probe(train_features, train_labels, cost=cost, balanced=balanced)
    test_features, test_labels = _check_samples(test_features, test_labels, "test")
    unseen = sorted(set(test_labels.tolist()) - set(model.classes_.tolist()), key=str)
    if unseen:
        raise ConfigError(
            f"linear probe: test labels {unseen} never occur in the train samples, so the probe cannot predict them. "
            "Use stratified folds, or drop those samples.",
            value=unseen,
        )
    if test_features.shape[1] != model.n_features_in_:
        raise ConfigError(
            f"linear probe: test features have {test_features.shape[1]} dimensions and train features {model.n_features_in_}. "
            "Use features of the same encoder and pooling on both sides.",
            value=[test_features.shape[1], model.n_features_in_],
        )

    probabilities = model.predict_proba(test_features)
    predictions = model.classes_[np.argmax(probabilities, axis=1)]
    metrics = classification_metrics(test_labels, probabilities, model.classes_)
    return ProbeResult(metrics=metrics, classes=model.classes_, predictions=predictions, probabilities=probabilities)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Return balanced accuracy, macro one-vs-rest ROC AUC and weighted F1 of class probabilities.

    ``probabilities`` is (N, C) with columns in the order of ``classes``, and the prediction is the
    class of largest probability. The AUC is NaN when the labels do not contain every class (a small
    bootstrap resample can miss one), because ROC AUC needs positives and negatives of each class.
    """
    labels = np.asarray(labels)
    predictions = classes[np.argmax(probabilities, axis=1)]
    metrics = {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "macro_auc": float("nan"),
        "weighted_f1": float(f1_score(labels, predictions, average="weighted", labels=classes, zero_division=0.0)),
    }
    if len(np.unique(labels)) == len(classes):
        if len(classes) == 2:
            metrics["macro_auc"] = float(roc_auc_score(labels == classes[1], probabilities[:, 1]))
        else:
            metrics["macro_auc"] = float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=classes))
    return metrics


def _check_samples(features: np.ndarray, labels: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise ConfigError(f"linear probe: {side} features have shape {features.shape}, expected (N, D) numbers.", value=list(features.shape))
    if labels.shape != (len(features),):
        raise ConfigError(
            f"linear probe: {len(features)} {side} feature rows but labels of shape {labels.shape}, expected one label per row.",
            value=list(labels.shape),
        )
    if len(features) == 0:
        raise ConfigError(f"linear probe: no {side} samples. Check the folds.", value=0)
    if not np.isfinite(features).all():
        raise ConfigError(f"linear probe: {side} features contain NaN or infinity. Check the encoder's output.", value="non-finite")
    return features, labels
