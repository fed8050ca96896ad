"""The report of a benchmark run: ``report.md``, ``report.json`` and two PNG figures in one folder.

``report.md`` has one table with a column per model and a row per metric. A cell is
``value [low, high]`` (the full-test-set value and the 95% percentile interval of the bootstrap
resamples) with one fold, and ``mean ± standard error`` over folds with several. Agreement with the
reference is always bootstrapped over all samples. The report states what the bootstraps drew: cases,
with all their samples, when the run had case ids, else single samples. ``report.json`` contains the same numbers unrounded,
with the per-fold values. ``metrics.png`` is a bar chart of every metric with error bars, and
``embeddings.png`` a 2-D map (PCA or t-SNE) of each model's features coloured by label.

Parameter counts and throughputs are reported only when they were given. A missing value is shown as
"not given" and listed with the option that supplies it. matplotlib draws without a display (the Agg
canvas), and no torch is imported.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.evaluation.bench import BenchResult
from shared.evaluation.bootstrap import MetricSummary

logger = logging.getLogger(__name__)

MAP_METHODS = ("pca", "tsne")
# More points than this make t-SNE slow and the scatter unreadable, so the map draws a seeded sample of rows.
MAX_MAP_POINTS = 5000
NOT_GIVEN = "not given"


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files :func:`write_report` wrote."""

    markdown: Path
    json: Path
    metrics_figure: Path
    embeddings_figure: Path


def write_report(result: BenchResult, out_dir: Path, *, map_method: str = "pca") -> ReportFiles:
    """Write ``report.md``, ``report.json``, ``metrics.png`` and ``embeddings.png`` into ``out_dir`` and return their paths."""
    if map_method not in MAP_METHODS:
        raise ConfigError(f"report: map method is {map_method!r}, expected one of {list(MAP_METHODS)}.", value=map_method, limit=list(MAP_METHODS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        markdown=out_dir / "report.md",
        json=out_dir / "report.json",
        metrics_figure=out_dir / "metrics.png",
        embeddings_figure=out_dir / "embeddings.png",
    )

    plot_metrics(result, files.metrics_figure)
    plot_embedding_maps(result, files.embeddings_figure, method=map_method)
    data = report_data(result, files)
    files.json.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    files.markdown.write_text(report_markdown(result, data, files), encoding="utf-8")
    logger.info("wrote benchmark report %s", files.markdown)
    return files


def report_data(result: BenchResult, files: ReportFiles | None = None) -> dict:
    """Return the report's numbers as JSON-ready data; NaN becomes None."""
    models = {}
    for model in result.models:
        info = model.feature_set.info
        models[model.name] = {
            "source": model.feature_set.source,
            "encoder": model.feature_set.encoder,
            "embedding_dim": model.dimension,
            "parameters": info.parameters,
            "throughput_tiles_per_s": info.throughput_tiles_per_s,
            "throughput_note": info.throughput_note,
            "info_source": info.source,
            "metrics": {name: _summary_data(summary) for name, summary in model.metrics().items()},
            "fold_metrics": {protocol: [_clean(metrics) for metrics in protocol_result.fold_metrics] for protocol, protocol_result in model.protocols.items()},
        }
    agreement = {
        item.model: {
            "reference": item.reference,
            "knn_k": item.knn_k,
            "knn_overlap_chance": item.knn_chance,
            "metrics": {name: _summary_data(summary) for name, summary in item.metrics.items()},
        }
        for item in result.agreement
    }
    return {
        "task": {
            **result.task,
            "samples": int(len(result.labels)),
            "classes": {str(label): count for label, count in sorted(Counter(result.labels.tolist()).items(), key=lambda item: str(item[0]))},
            "folds": len(result.folds),
            "interval": result.interval_method,
            "bootstrap_unit": result.bootstrap_unit,
            "bootstrap_cases": None if result.groups is None else int(len(set(result.groups.tolist()))),
            "reference": result.reference,
        },
        "options": {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(result.options).items()},
        "models": models,
        "agreement": agreement,
        "missing": missing_information(result),
        "figures": {} if files is None else {"metrics": files.metrics_figure.name, "embeddings": files.embeddings_figure.name},
    }


def missing_information(result: BenchResult) -> list[str]:
    """Return one sentence per model-information field that no model or only some models were given."""
    fields = {"parameters": "parameter count", "throughput_tiles_per_s": "measured throughput"}
    sentences = []
    for key, description in fields.items():
        lacking = [model.name for model in result.models if getattr(model.feature_set.info, key) is None]
        if lacking:
            sentences.append(
                f"No {description} was given for {', '.join(lacking)}. Pass --model-info NAME=JSON with {key!r}, "
                f"or write a {key!r} attribute into the feature files."
            )
    return sentences


def report_markdown(result: BenchResult, data: dict, files: ReportFiles) -> str:
    """Return ``report.md``: the task, the one table of every metric by model, the missing information and the figures."""
    names = [model.name for model in result.models]
    options = result.options
    unit = result.bootstrap_unit
    if result.interval_method == "bootstrap":
        interval = (
            f"one fold, so each cell is the test-set value [2.5th, 97.5th percentile] of {options.bootstrap_resamples} "
            f"bootstrap resamples of the test {unit}s"
        )
    else:
        interval = f"{len(result.folds)} folds, so each cell is the mean ± standard error over folds"
    classes = ", ".join(f"{label} {count}" for label, count in data["task"]["classes"].items())

    lines = ["# Benchmark report", ""]
    for key, value in result.task.items():
        lines.append(f"- {key}: {value}")
    lines += [
        f"- samples: {len(result.labels)} ({classes})",
        f"- intervals: {interval}. Agreement with the reference is bootstrapped over all {unit}s "
        f"({options.bootstrap_resamples} resamples, 95% percentile interval).",
        f"- bootstrap unit: {_bootstrap_unit_text(result, data)}",
        f"- linear probe: LogisticRegression(C={options.cost}, max_iter=10000, class_weight={'balanced' if options.balanced else None!r}) on raw features.",
        f"- retrieval: test samples query the train samples of each fold by {' and '.join(options.retrieval_metrics)}, k in {', '.join(map(str, options.ks))}.",
        f"- reference model: {result.reference}; neighbours for agreement ranked by {options.agreement_metric} similarity.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]

    lines.append(_row("parameters", [_integer(data["models"][name]["parameters"]) for name in names]))
    lines.append(_row("embedding dimension", [str(data["models"][name]["embedding_dim"]) for name in names]))
    lines.append(_row("throughput (tiles/s)", [_number(data["models"][name]["throughput_tiles_per_s"], 1) for name in names]))
    for metric in result.models[0].metrics():
        lines.append(_row(metric, [_cell(model.metrics()[metric]) for model in result.models]))
    agreement = {item.model: item for item in result.agreement}
    for metric in result.agreement[0].metrics if result.agreement else []:
        cells = ["reference" if name == result.reference else _cell(agreement[name].metrics[metric]) for name in names]
        lines.append(_row(f"agreement.{metric}", cells))

    notes = []
    if result.agreement:
        first = result.agreement[0]
        notes.append(f"Two unrelated spaces score about {first.knn_chance:.3f} on agreement.knn_overlap@{first.knn_k} (k / (N - 1)).")
    for model in result.models:
        if model.feature_set.info.throughput_note:
            notes.append(f"Throughput of {model.name}: {model.feature_set.info.throughput_note}.")
    notes += data["missing"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]

    lines += [
        "",
        "## Figures",
        "",
        f"![metrics with error bars]({files.metrics_figure.name})",
        "",
        f"![2-D map of each model's features, coloured by label]({files.embeddings_figure.name})",
        "",
    ]
    return "\n".join(lines)


def _bootstrap_unit_text(result: BenchResult, data: dict) -> str:
    """Return the sentence of ``report.md`` that states what the bootstraps drew with replacement."""
    if result.groups is None:
        return (
            "sample. Each resample draws single samples with replacement, because no case ids were given. Samples of one "
            "slide or case are correlated, so these intervals are too narrow when a case contributes several samples."
        )
    return (
        f"case. Each resample draws cases with replacement and takes every sample of each drawn case "
        f"({data['task']['bootstrap_cases']} cases among the {len(result.labels)} samples), because samples of one case are correlated."
    )


def plot_metrics(result: BenchResult, path: Path) -> Path:
    """Draw every protocol metric of every model, and the agreement metrics, as horizontal bars with error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("protocol metrics", [model.name for model in result.models], {model.name: model.metrics() for model in result.models})]
    if result.agreement:
        agreement = {item.model: item.metrics for item in result.agreement}
        panels.append((f"agreement with {result.reference}", list(agreement), agreement))

    rows = max(len(next(iter(metrics.values()))) for _, _, metrics in panels)
    figure = Figure(figsize=(7.0 * len(panels), 1.0 + 0.3 * rows * max(1, len(result.models)) ** 0.5))
    FigureCanvasAgg(figure)
    for column, (title, names, metrics) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), column + 1)
        metric_names = list(metrics[names[0]])
        height = min(0.8 / len(names), 0.4)
        for position, name in enumerate(names):
            summaries = [metrics[name][metric] for metric in metric_names]
            values = np.array([_finite_or_zero(summary.mean) for summary in summaries])
            axes.barh(
                np.arange(len(metric_names)) + (position - (len(names) - 1) / 2) * height,
                values,
                height=height,
                xerr=_error_bars(summaries),
                capsize=2,
                label=name,
            )
        axes.set_yticks(np.arange(len(metric_names)), metric_names, fontsize=7)
        axes.invert_yaxis()
        axes.set_xlim(0.0, 1.05)
        axes.set_title(title)
        axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_embedding_maps(result: BenchResult, path: Path, *, method: str = "pca") -> Path:
    """Draw a 2-D map of each model's features, one panel per model, coloured by label.

    PCA projects on the first two principal components. t-SNE (scikit-learn, PCA initialisation,
    perplexity min(30, (N - 1) / 3)) shows neighbourhoods but not distances. Both use at most
    :data:`MAX_MAP_POINTS` rows, the same seeded sample for every model.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    labels = result.labels
    rows = np.arange(len(labels))
    if len(rows) > MAX_MAP_POINTS:
        rows = np.sort(np.random.default_rng(result.options.seed).choice(rows, MAX_MAP_POINTS, replace=False))
    classes = sorted(set(labels[rows].tolist()), key=str)
    colours = _colours(len(classes))

    figure = Figure(figsize=(4.5 * len(result.models), 4.6))
    FigureCanvasAgg(figure)
    for column, model in enumerate(result.models):
        features = model.feature_set.features[rows].astype(np.float64)
        axes = figure.add_subplot(1, len(result.models), column + 1)
        if method == "tsne" and len(rows) > 3:
            points = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3.0), random_state=result.options.seed).fit_transform(features)
            axes.set_title(f"{model.name} ({model.dimension}-d), t-SNE", fontsize=9)
        else:
            pca = PCA(n_components=min(2, features.shape[1]), random_state=result.options.seed)
            points = pca.fit_transform(features)
            if points.shape[1] == 1:
                points = np.concatenate([points, np.zeros_like(points)], axis=1)
            explained = 100.0 * float(pca.explained_variance_ratio_.sum())
            axes.set_title(f"{model.name} ({model.dimension}-d), PCA: {explained:.0f}% of variance", fontsize=9)
        for label, colour in zip(classes, colours):
            chosen = labels[rows] == label
            axes.scatter(points[chosen, 0], points[chosen, 1], s=8, color=colour, label=str(label), alpha=0.8)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.axes[0].legend(fontsize=7, markerscale=1.5, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _summary_data(summary: MetricSummary) -> dict:
    """Return a summary as JSON data: ``estimate`` is the full-test-set value with one fold, the mean over folds with several."""
    return {
        "estimate": _clean_number(summary.mean),
        "standard_error": _clean_number(summary.standard_error),
        "low": _clean_number(summary.low),
        "high": _clean_number(summary.high),
        "method": summary.method,
        "count": summary.count,
    }


def _cell(summary: MetricSummary) -> str:
    if not math.isfinite(summary.mean):
        return "n/a"
    if summary.method == "bootstrap":
        if summary.low is None or summary.high is None:
            return f"{summary.mean:.3f}"
        return f"{summary.mean:.3f} [{summary.low:.3f}, {summary.high:.3f}]"
    if not math.isfinite(summary.standard_error):
        return f"{summary.mean:.3f}"
    return f"{summary.mean:.3f} ± {summary.standard_error:.3f}"


def _row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def _integer(value: int | None) -> str:
    return NOT_GIVEN if value is None else f"{int(value):,}"


def _number(value: float | None, decimals: int) -> str:
    return NOT_GIVEN if value is None else f"{value:.{decimals}f}"


def _error_bars(summaries: list[MetricSummary]) -> np.ndarray:
    """Return (2, M) lower and upper bar lengths: to the percentile bounds of a bootstrap, one standard error for folds."""
    lower, upper = [], []
    for summary in summaries:
        mean = _finite_or_zero(summary.mean)
        if summary.method == "bootstrap" and summary.low is not None and summary.high is not None:
            lower.append(max(0.0, mean - summary.low))
            upper.append(max(0.0, summary.high - mean))
        else:
            error = _finite_or_zero(summary.standard_error)
            lower.append(error)
            upper.append(error)
    return np.array([lower, upper])


def _colours(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


def _finite_or_zero(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else 0.0


def _clean_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {name: _clean_number(value) for name, value in metrics.items()}
