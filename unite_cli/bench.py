"""``unite bench``: score two or more models' features of the same labelled samples and write a report.

The inputs are read by :mod:`shared.evaluation.bench_inputs`, the protocols run in
:func:`shared.evaluation.bench.run_bench`, and :func:`shared.evaluation.report.write_report` writes
OUT/report.md, OUT/report.json and the figures. Folds made here are written to OUT/split.tsv, so a
later run (or Patho-Bench) can reuse them with --split. Bootstrap intervals resample cases, each with
all its samples. No torch is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

# Importing shared.evaluation loads scikit-learn (about a second), so `unite --help` would pay for it.
# These copies of its constants keep the parser light, and tests/test_bench.py checks that they match.
LEVELS = ("slide", "tile")
MAP_METHODS = ("pca", "tsne")
BOOTSTRAP_RESAMPLES = 100

DESCRIPTION = (
    "Benchmark two or more models on the same labelled samples: a linear probe (balanced accuracy, macro AUC, "
    "weighted F1), retrieval by l2 and cosine similarity (top-k accuracy, majority vote@k and mAP@k for k = 1, 5, 10), "
    "and agreement of each model with the reference (linear CKA, k-NN overlap, nearest-neighbour label agreement). "
    "Each --features folder holds TRIDENT-layout ID.h5 files: pooled slide or case features, or patch features with "
    "--level tile. Folds come from --split, or are made here, stratified by label and grouped by case. Writes "
    "OUT/report.md, OUT/report.json, OUT/metrics.png and OUT/embeddings.png."
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite bench`` to its subparser."""
    parser.add_argument(
        "--features",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a model's name and its folder of ID.h5 feature files; repeat for each model, at least twice",
    )

    add_label_arguments(parser, labels_help="CSV with a slide_id or case_id column (the file names) and a label column; folds are made here")
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="output folder for the report and figures (created if missing)")
    parser.add_argument(
        "--level",
        choices=LEVELS,
        default="slide",
        help="slide: one pooled file per slide or case; tile: patch files whose tiles are the samples, each taking its slide's label (default: slide)",
    )
    parser.add_argument("--reference", default=None, metavar="NAME", help="model the others are compared with for agreement (default: the first --features)")
    parser.add_argument(
        "--model-info",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="JSON file with a model's parameters, embedding_dim, throughput_tiles_per_s and throughput_note "
        "(default: the feature files' attributes; values given nowhere are reported as not given)",
    )

    add_probe_arguments(parser)
    add_agreement_arguments(parser)


def add_label_arguments(parser: argparse.ArgumentParser, *, labels_help: str) -> None:
    """Add the required choice of ``--labels`` (described by ``labels_help``) or ``--split``, and ``--label-column``."""
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", type=Path, metavar="CSV", help=labels_help)
    labels.add_argument("--split", type=Path, metavar="TSV", help="Patho-Bench split TSV with case_id, slide_id, a label and fold_0 ... fold_K columns")
    parser.add_argument(
        "--label-column", default=None, help="label column of --labels or --split (default: 'label', or the one column that is not an id or a fold)"
    )


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the linear probe, the folds made here and the bootstrap intervals."""
    parser.add_argument("--cost", type=float, default=1.0, help="inverse L2 regularisation strength C of the linear probe (default: 1.0)")
    parser.add_argument(
        "--balanced", action=argparse.BooleanOptionalAction, default=True, help="weight the probe's classes by inverse frequency (default: --balanced)"
    )
    parser.add_argument("--folds", type=int, default=5, help="folds to make without --split; 1 makes one split bootstrapped for intervals (default: 5)")
    parser.add_argument("--test-size", type=float, default=0.2, help="fraction of samples in the test set with --folds 1 (default: 0.2)")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"bootstrap resamples for the intervals, each drawing cases with all their samples (default: {BOOTSTRAP_RESAMPLES})",
    )


def add_agreement_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the agreement metrics, the 2-D map method and the seed."""
    parser.add_argument("--knn-k", type=int, default=10, help="neighbours compared by the k-NN overlap (default: 10, lowered to N - 1 for fewer samples)")
    parser.add_argument(
        "--agreement-metric", choices=("cosine", "l2"), default="cosine", help="similarity that ranks neighbours for agreement (default: cosine)"
    )
    parser.add_argument("--map", choices=MAP_METHODS, default="pca", help="2-D map of the features in embeddings.png (default: pca)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, the bootstrap and the map (default: 0)")


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``unite bench``, print the report's path and each model's headline metrics, and return the exit status 0."""
    from shared.evaluation.bench import BenchOptions, run_bench
    from shared.evaluation.bench_inputs import load_bench_task, parse_named_paths, read_labels_csv, read_split_labels
    from shared.evaluation.folds import make_folds, write_split_tsv
    from shared.evaluation.report import write_report

    folders = parse_named_paths(args.features, "--features")
    if len(folders) < 2:
        raise ConfigError(f"--features is given {len(folders)} time, expected at least 2 models to compare. Repeat --features NAME=DIR.", value=len(folders))
    model_info = parse_named_paths(args.model_info, "--model-info")
    if args.reference is not None and args.reference not in folders:
        raise ConfigError(f"--reference {args.reference!r} is not one of the --features names {list(folders)}.", value=args.reference, limit=list(folders))

    if args.split is not None:
        bench_labels = read_split_labels(args.split, args.label_column)
        folds_text = f"{len(bench_labels.folds)} folds from {args.split}"
    else:
        bench_labels = read_labels_csv(args.labels, args.label_column)
        folds = make_folds(bench_labels.labels, bench_labels.case_ids, n_folds=args.folds, test_size=args.test_size, seed=args.seed)
        bench_labels = dataclasses.replace(bench_labels, folds=folds)
        folds_text = f"{len(folds)} folds made by unite bench (stratified by label, grouped by case, seed {args.seed}), written to split.tsv"

    task = load_bench_task(folders, bench_labels, level=args.level, model_info=model_info)
    if args.split is None:
        write_split_tsv(
            args.out / "split.tsv",
            case_ids=bench_labels.case_ids,
            slide_ids=bench_labels.sample_ids,
            labels=bench_labels.labels,
            folds=bench_labels.folds,
            label_column=bench_labels.label_column,
        )
    options = BenchOptions(
        cost=args.cost,
        balanced=args.balanced,
        reference=args.reference,
        agreement_metric=args.agreement_metric,
        knn_k=args.knn_k,
        bootstrap_resamples=args.bootstrap,
        seed=args.seed,
    )
    # Samples of one case are correlated, so the bootstraps draw cases (a slide without a case_id is its own case).
    result = run_bench(task.feature_sets, task.labels, task.folds, options, groups=task.case_ids)
    result = dataclasses.replace(result, task=_describe_task(args, bench_labels, task.level, folds_text, len(task.labels)))
    files = write_report(result, args.out, map_method=args.map)

    print(f"wrote {files.markdown}")
    for model in result.models:
        summary = model.metrics()["linear_probe.balanced_accuracy"]
        print(f"{model.name}: balanced accuracy {summary.mean:.3f}, {model.dimension}-d")
    return 0


def _describe_task(args: argparse.Namespace, bench_labels, level: str, folds_text: str, rows: int) -> dict[str, str]:
    import numpy as np

    from shared.evaluation.bench_inputs import parse_named_paths

    samples = f"{len(bench_labels.sample_ids)} {'slides' if level == 'tile' else 'samples'} in {len(np.unique(bench_labels.case_ids))} cases"
    description = {
        "level": level if level == "tile" else "slide or case (one pooled feature per sample)",
        "labels": f"{bench_labels.source}, column {bench_labels.label_column!r}",
        "cohort": samples + (f", {rows} tiles" if level == "tile" else ""),
        "folds": folds_text,
    }
    for name, folder in parse_named_paths(args.features, "--features").items():
        description[f"features of {name}"] = str(folder)
    return description
