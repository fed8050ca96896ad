"""``unite evaluate``: embed labelled slides with two or more served models, pool them and benchmark them side by side.

Each ``--model NAME=URL`` is a server of the embeddings protocol: a teacher gateway, a student server,
or any compatible endpoint. Every slide is tiled once and its tiles go to each model
(:mod:`shared.evaluation.extract`). The patch features land in ``OUT/features/NAME/SLIDE.h5``, the
pooled slide features in ``OUT/slide_features/NAME/SLIDE.h5``, and the protocols of ``unite bench``
write ``OUT/report.md``, ``OUT/report.json``, the figures and ``OUT/split.tsv``. When the labels have a
``case_id`` column, a slide-level run is a case-level task: the slide embeddings of each case are
averaged into ``OUT/case_features/NAME/CASE.h5`` (:mod:`shared.evaluation.cases`), and every case is
one sample. Slides whose feature file exists for a model are not sent to it again, so the same
command resumes an interrupted run. Each model's throughput is measured while it embeds and stored
with its parameter count (from the server's ``GET /v1/models``) in
``OUT/features/NAME/model-info.json``, which a rerun that sends it no tiles reads. The slide, HTTP and
evaluation modules are imported only when the command runs, so ``unite --help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import re
from pathlib import Path

from shared.errors import ConfigError
from shared.pooling import POOLING_METHODS
from unite_cli.bench import LEVELS, add_agreement_arguments, add_label_arguments, add_probe_arguments
from unite_cli.slide_options import add_resolution_arguments, add_slide_source_arguments, add_tiling_arguments, resolution_overrides, tile_options

logger = logging.getLogger(__name__)

FEATURES_FOLDER = "features"
POOLED_FOLDER = "slide_features"
CASES_FOLDER = "case_features"
_NAME = re.compile(r"[A-Za-z0-9._+-]+")

DESCRIPTION = (
    "Embed labelled slides with two or more models served over the embeddings protocol (a teacher gateway, a "
    "student server, or a compatible endpoint), pool the patch features into slide features and benchmark the "
    "models side by side as unite bench does. Each slide is tiled once and its tiles are sent to every model. "
    "At --level slide with a case_id column in the labels, each case is one sample whose feature is the mean of its slides' "
    "features (OUT/case_features/NAME/CASE.h5), so the slides of a case must share its label. "
    "Writes OUT/features/NAME/SLIDE.h5 (TRIDENT layout, encoder from the server's response), "
    "OUT/slide_features/NAME/SLIDE.h5, OUT/split.tsv, OUT/report.md, OUT/report.json, OUT/metrics.png and "
    "OUT/embeddings.png. Slides whose feature file exists for a model are not sent to it again. Each model's throughput "
    "(tiles per second of its embedding requests) and parameter count (from its GET /v1/models) go into the report and "
    "OUT/features/NAME/model-info.json, which a rerun that sends the model no tiles reads. The API key of "
    "model NAME is read from UNITE_API_KEY_<NAME in capitals, other characters as _>, else from UNITE_API_KEY, "
    "and sent as a Bearer token. Exit status: 0 after the report, 1 when a slide could not be tiled (no report), "
    "2 for invalid options or a model that fails."
)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``unite evaluate`` to its subparser."""
    add_slide_source_arguments(parser)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=URL",
        help="a model's name and the base URL of its embeddings server, e.g. teacher=http://127.0.0.1:8100; repeat for each model, at least twice",
    )
    add_label_arguments(parser, labels_help="CSV with a slide_id column (slide file names without extension), a label column and optionally case_id")
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="output folder for features, report and figures (created if missing)")

    add_resolution_arguments(parser)
    add_tiling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="tiles per embeddings request, at least 1 (default: 32)")
    parser.add_argument("--read-workers", type=int, default=1, metavar="N", help="threads per slide that read tiles (default: 1)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="time limit of one embeddings request in seconds (default: 300)")

    parser.add_argument(
        "--level",
        choices=LEVELS,
        default="slide",
        help=(
            "slide: one pooled feature per slide is a sample, or per case (the mean of its slides) when the labels have a case_id "
            "column; tile: every patch is a sample with its slide's label and fold side (default: slide)"
        ),
    )
    parser.add_argument("--pooling", choices=POOLING_METHODS, default="mean", help="how patch features become the slide feature (default: mean)")
    parser.add_argument("--reference", default=None, metavar="NAME", help="model the others are compared with for agreement (default: the first --model)")
    parser.add_argument(
        "--model-info",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help=(
            "JSON file with a model's parameters, embedding_dim, throughput_tiles_per_s and throughput_note; its values replace "
            "the parameter count from the server and the throughput measured while embedding (default: those two)"
        ),
    )
    add_probe_arguments(parser)
    parser.add_argument(
        "--ks",
        type=_positive_ints,
        default=(1, 5, 10),
        metavar="K,K,...",
        help="k values of the retrieval metrics, each at most the smallest train set of a fold (default: 1,5,10)",
    )
    add_agreement_arguments(parser)


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid, expected whole numbers separated by commas, such as 1,5,10") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid, expected k values of at least 1")
    return values


def parse_model_urls(values: list[str]) -> dict[str, str]:
    """Parse ``--model NAME=URL`` values into an ordered mapping; raise :class:`ConfigError` for a bad or repeated name."""
    models: dict[str, str] = {}
    for value in values:
        name, separator, url = value.partition("=")
        name, url = name.strip(), url.strip()
        if not separator or not name or not url:
            raise ConfigError(f"--model {value!r} is invalid, expected NAME=URL, for example --model student=http://127.0.0.1:8200.", value=value)
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"--model: name {name!r} is invalid, expected letters, digits and . _ + - only, because it names a folder and a report column.",
                value=name,
            )
        if name in models:
            raise ConfigError(f"--model: name {name!r} is given twice. Give each model a different name.", value=name)
        models[name] = url
    if len(models) < 2:
        raise ConfigError(f"--model is given {len(models)} time, expected at least 2 models to compare. Repeat --model NAME=URL.", value=len(models))
    return models


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``unite evaluate`` and return its exit status (see :data:`DESCRIPTION`)."""
    from shared.evaluation.bench_inputs import parse_named_paths
    from shared.evaluation.cases import cases_from_slides, pool_model_cases
    from shared.evaluation.extract import EmbeddingsClient, api_key_for, check_encoders, describe_endpoints, pool_model_features, record_model_info
    from shared.slides.sources import collect_slides
    from shared.slides.tile_job import slide_jobs

    models = parse_model_urls(args.model)
    model_info = parse_named_paths(args.model_info, "--model-info")
    for name in [*model_info, *([args.reference] if args.reference else [])]:
        if name not in models:
            raise ConfigError(f"{name!r} is not one of the --model names {list(models)}. Use the names given to --model.", value=name, limit=list(models))
    options = tile_options(args, read_workers=args.read_workers)
    mpp, mpp_table = resolution_overrides(args)
    bench_labels = _read_labels(args)
    # Checked before any tile is sent, so that slides of one case with different labels stop the run early.
    cases = cases_from_slides(bench_labels) if args.level == "slide" and bench_labels.has_case_ids else None

    slides = collect_slides(args.sources, recursive=args.recursive, exclude=[args.out])
    labelled = set(bench_labels.sample_ids.tolist())
    found = {slide.name for slide in slides}
    missing = [slide_id for slide_id in bench_labels.sample_ids if slide_id not in found]
    if missing:
        raise ConfigError(
            f"{len(missing)} labelled slides were not found among the slide sources (first: {missing[:5]}). A slide_id is the slide's "
            f"file name without its extension. Pass the folders that hold them, or remove their rows from {bench_labels.source}.",
            value=missing[:5],
        )
    unlabelled = sorted(found - labelled)
    if unlabelled:
        logger.warning("%d slides have no label in %s and are not embedded (first: %s)", len(unlabelled), bench_labels.source, unlabelled[:5])
    jobs = slide_jobs([slide for slide in slides if slide.name in labelled], options, mpp=mpp, mpp_table=mpp_table)

    clients = {}
    try:
        for name, url in models.items():
            key, source = api_key_for(name)
            clients[name] = EmbeddingsClient(name, url, batch_size=args.batch_size, timeout=args.timeout, api_key=key, api_key_source=source)
        failures, sent = _extract_all(jobs, list(clients.values()), args.out / FEATURES_FOLDER, options, args.batch_size)
        requests = {name: client.requests for name, client in clients.items()}
        print(f"embedded {sent} slide-model pairs; embedding requests: " + ", ".join(f"{name} {count}" for name, count in requests.items()))
        if failures:
            for name, message in failures:
                print(f"failed: {name}: {message}")
            print(
                f"{len(failures)} slides could not be tiled, so no report was written. Fix them, or remove their rows from {bench_labels.source}, "
                "and run again."
            )
            return 1

        slide_names = [str(slide_id) for slide_id in bench_labels.sample_ids]
        encoders = check_encoders(args.out / FEATURES_FOLDER, list(models), slide_names)
        measured = {name: record_model_info(args.out / FEATURES_FOLDER, client, encoders[name]) for name, client in clients.items()}
    finally:
        for client in clients.values():
            client.close()
    for name, info in measured.items():
        throughput = info["throughput_tiles_per_s"]
        print(f"{name}: parameters {info['parameters'] or 'not listed'}, throughput " + ("not measured" if throughput is None else f"{throughput:.1f} tiles/s"))

    if args.level == "slide":
        folders = pool_model_features(args.out / FEATURES_FOLDER, args.out / POOLED_FOLDER, list(models), slide_names, method=args.pooling)
        if cases is not None:
            folders = pool_model_cases(folders, args.out / CASES_FOLDER, cases, method=args.pooling)
    else:
        folders = {name: args.out / FEATURES_FOLDER / name for name in models}
    endpoints = describe_endpoints(clients, encoders)
    return _benchmark(args, bench_labels, cases, folders, model_info, endpoints, measured)


def _read_labels(args: argparse.Namespace):
    """Read --labels or --split; a labels CSV must name slides, because slides are what gets embedded."""
    from shared.evaluation.bench_inputs import read_labels_csv, read_split_labels

    if args.split is not None:
        return read_split_labels(args.split, args.label_column)
    if args.labels.is_file():
        with args.labels.open(newline="", encoding="utf-8") as file:
            columns = next(csv.reader(file), [])
        if "slide_id" not in columns:
            raise ConfigError(
                f"labels file {args.labels} has no slide_id column (columns: {columns}). unite evaluate embeds slides, so name "
                "each slide by its file name without extension in a slide_id column, and its case in case_id.",
                value=columns,
            )
    return read_labels_csv(args.labels, args.label_column)


def _extract_all(jobs, clients, features_root: Path, options, batch_size: int) -> tuple[list[tuple[str, str]], int]:
    """Embed every slide with the models that lack its features; return the slides that failed and the slide-model pairs sent."""
    from shared.errors import SlideError
    from shared.evaluation.extract import extract_slide

    failures = []
    sent = 0
    for position, job in enumerate(jobs, start=1):
        try:
            extraction = extract_slide(job.payload, clients, features_root, options, name=job.name, batch_size=batch_size)
        except SlideError as error:
            logger.error("slide %s could not be tiled: %s", job.name, error.message)
            failures.append((job.name, error.message))
            continue
        done = [model for model, embedded in extraction.embedded.items() if embedded]
        sent += len(done)
        if done:
            logger.info("slide %d of %d, %s: embedded by %s", position, len(jobs), job.name, ", ".join(done))
        else:
            logger.info("slide %d of %d, %s: every model has its features, skipped", position, len(jobs), job.name)
    return failures, sent


def _benchmark(
    args: argparse.Namespace,
    bench_labels,
    cases,
    folders: dict[str, Path],
    model_info: dict[str, Path],
    endpoints: dict[str, str],
    measured: dict[str, dict],
) -> int:
    """Run the protocols of ``unite bench`` on the features of every model and write the report into OUT.

    ``bench_labels`` lists the slides. ``cases`` is their :class:`shared.evaluation.cases.CaseTable` for a
    case-level task, whose samples are the cases, and None otherwise. ``measured`` contains each model's
    parameter count and throughput from this run, which fill what ``--model-info`` leaves out.
    """
    import numpy as np

    from shared.evaluation.bench import BenchOptions, run_bench
    from shared.evaluation.bench_inputs import expand_fold, load_bench_task
    from shared.evaluation.folds import make_folds, write_split_tsv
    from shared.evaluation.report import write_report

    sample_labels = bench_labels if cases is None else cases.labels
    if sample_labels.folds is None:
        folds = make_folds(sample_labels.labels, sample_labels.case_ids, n_folds=args.folds, test_size=args.test_size, seed=args.seed)
        sample_labels = dataclasses.replace(sample_labels, folds=folds)
        folds_text = f"{len(folds)} folds made by unite evaluate (stratified by label, grouped by case, seed {args.seed}), written to split.tsv"
        # split.tsv lists slides, as a Patho-Bench split does, so a case-level run writes each slide on its case's side.
        write_split_tsv(
            args.out / "split.tsv",
            case_ids=bench_labels.case_ids,
            slide_ids=bench_labels.sample_ids,
            labels=bench_labels.labels,
            folds=folds if cases is None else [expand_fold(fold, cases.case_of_slide) for fold in folds],
            label_column=bench_labels.label_column,
        )
    else:
        folds_text = f"{len(sample_labels.folds)} folds from {args.split.name}"

    task = load_bench_task(folders, sample_labels, level=args.level, model_info=model_info)
    feature_sets = [
        dataclasses.replace(feature_set, info=_fill_measured(feature_set.info, measured[feature_set.name], args.out / FEATURES_FOLDER / feature_set.name))
        for feature_set in task.feature_sets
    ]
    options = BenchOptions(
        cost=args.cost,
        balanced=args.balanced,
        reference=args.reference,
        ks=args.ks,
        agreement_metric=args.agreement_metric,
        knn_k=args.knn_k,
        bootstrap_resamples=args.bootstrap,
        seed=args.seed,
    )
    # Samples of one case are correlated, so the bootstraps draw cases (a slide without a case_id is its own case).
    result = run_bench(feature_sets, task.labels, task.folds, options, groups=task.case_ids)
    cohort = f"{len(bench_labels.sample_ids)} slides in {len(np.unique(bench_labels.case_ids))} cases"
    if args.level == "tile":
        level = "tile (every patch is a sample)"
    elif cases is not None:
        level = f"case ({args.pooling} pooling of each slide's patch features, then the mean of the slide features of each case)"
    else:
        level = f"slide ({args.pooling} pooling of the patch features)"
    description = {
        "level": level,
        "labels": f"{bench_labels.source.name}, column {bench_labels.label_column!r}",
        "cohort": cohort + (f", {len(task.labels)} tiles" if args.level == "tile" else ""),
        "folds": folds_text,
        **endpoints,
    }
    files = write_report(dataclasses.replace(result, task=description), args.out, map_method=args.map)

    print(f"wrote {files.markdown}")
    for model in result.models:
        summary = model.metrics()["linear_probe.balanced_accuracy"]
        print(f"{model.name}: balanced accuracy {summary.mean:.3f}, {model.dimension}-d")
    return 0


def _fill_measured(info, measured: dict, folder: Path):
    """Return ``info`` (from --model-info or the feature files) with its missing parameter count and throughput taken from ``measured``.

    A throughput keeps the note that came with it, so a rate from --model-info is never described as measured here.
    """
    from shared.evaluation.bench_inputs import ModelInfo
    from shared.evaluation.extract import MODEL_INFO_FILE

    parameters = info.parameters
    throughput, note = info.throughput_tiles_per_s, info.throughput_note
    filled = []
    if parameters is None and measured.get("parameters") is not None:
        parameters = measured["parameters"]
        filled.append("parameters")
    if throughput is None and measured.get("throughput_tiles_per_s") is not None:
        throughput, note = measured["throughput_tiles_per_s"], measured.get("throughput_note")
        filled.append("throughput")
    sources = [info.source] if info.source else []
    if filled:
        sources.append(f"{' and '.join(filled)} from unite evaluate ({folder / MODEL_INFO_FILE})")
    return ModelInfo(parameters=parameters, throughput_tiles_per_s=throughput, throughput_note=note, source="; ".join(sources) or None)
