"""Benchmark protocols following Patho-Bench: folds, linear probe, retrieval and their uncertainty.

numpy and scikit-learn only, no torch, so benchmarks run on any machine that has the features.
"""

from shared.evaluation.bootstrap import MetricSummary, bootstrap_resample_metrics, summarize_bootstrap, summarize_folds
from shared.evaluation.folds import Fold, SplitTable, check_grouped, make_folds, read_split_tsv, write_split_tsv
from shared.evaluation.linear_probe import PROBE_METRICS, ProbeResult, classification_metrics, evaluate_linear_probe, fit_linear_probe
from shared.evaluation.protocols import ProtocolResult, load_pooled_features, run_linear_probe, run_retrieval
from shared.evaluation.retrieval import DEFAULT_KS, RetrievalResult, evaluate_retrieval, rank_database, retrieval_metric_names, retrieval_scores

__all__ = [
    "DEFAULT_KS",
    "PROBE_METRICS",
    "Fold",
    "MetricSummary",
    "ProbeResult",
    "ProtocolResult",
    "RetrievalResult",
    "SplitTable",
    "bootstrap_resample_metrics",
    "check_grouped",
    "classification_metrics",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "fit_linear_probe",
    "load_pooled_features",
    "make_folds",
    "rank_database",
    "read_split_tsv",
    "retrieval_metric_names",
    "retrieval_scores",
    "run_linear_probe",
    "run_retrieval",
    "summarize_bootstrap",
    "summarize_folds",
    "write_split_tsv",
]
