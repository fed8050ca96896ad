"""The original UNITE recipe against our default recipe: same teacher embeddings, same tile presentations.

The labelled tiles are embedded once by the reference teacher (the embeddings are kept in
``OUT/teacher.npz`` and reused on a rerun), then split into train and held-out tiles, stratified by
class with a fixed seed, each tile its own group. The train tiles are written as training shards with a
made-up slide id per tile, so ``distill`` keeps each tile whole on one side and, with ``val_fraction``
0, trains on all of them. Two students are distilled with :func:`distiller.train.distill` for the same
number of tile presentations (optimiser steps x batch size):

- ``original``: batch 2, the ``unite`` loss (teacher projected down to the student's width, symmetric
  InfoNCE at the fixed temperature 0.07), no augmentation;
- ``ours``: the :class:`DistillConfig` defaults (``mimic+infonce`` loss, batch 64, default augmentations).

Every other setting (learning rate, warm-up, clipping, precision, seed) is the DistillConfig default for
both. Each recipe writes checkpoints every few steps, so a rerun with the same arguments resumes a killed
run, and skips a recipe whose student was already exported. On the held-out tiles the script reports
each student's k-NN overlap with the teacher and linear CKA, with bootstrap intervals, and the
linear-probe balanced accuracy of each student and of the teacher (probes trained on the train tiles).
``--evaluate-checkpoint RECIPE=PATH`` evaluates a stopped run from a Lightning checkpoint instead of
training that recipe.

    python benchmarks/recipes.py --tiles ../shared/data/tiles/lc25000_lung_dedup --out /tmp/recipes/run
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from distiller.config import DistillConfig
from distiller.train import distill
from shared.agreement import bootstrap_interval, knn_overlap_chance, knn_overlap_per_tile, linear_cka
from shared.checkpoint import load_student
from shared.imaging import prepare_tile, to_model_input
from shared.models.student import build_student
from shared.shards import shard_name, write_shard

logger = logging.getLogger("benchmarks.recipes")

RECIPES = ("original", "ours")
ORIGINAL_BATCH_SIZE = 2
EMBED_BATCH_SIZE = 32
# Checkpoints per recipe run: a killed run loses at most 1/CHECKPOINTS_PER_RUN of its steps.
CHECKPOINTS_PER_RUN = 20


def load_labelled_tiles(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load the tiles listed in ``folder/labels.csv`` (columns ``path`` and ``label``) as prepared 224 px RGB tiles."""
    with open(folder / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise SystemExit(f"{folder / 'labels.csv'} lists no tiles, expected one row per tile with columns path and label.")
    tiles = np.stack([prepare_tile(np.asarray(Image.open(folder / row["path"]).convert("RGB")), name=row["path"]) for row in rows])
    labels = np.array([row["label"] for row in rows])
    return tiles, labels, [row["path"] for row in rows]


def teacher_embeddings(tiles: np.ndarray, paths: list[str], cache: Path) -> tuple[np.ndarray, str, str]:
    """Embed ``tiles`` with the reference teacher, or read the embeddings an earlier run stored in ``cache``."""
    from teacher_gateway.teachers.reference import ReferenceTeacher

    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if list(stored["paths"]) == paths:
            logger.info("read %d teacher embeddings from %s", len(paths), cache)
            return stored["embeddings"], str(stored["teacher"]), str(stored["licence"])
        logger.warning("%s contains embeddings of other tiles, so the tiles are embedded again", cache)

    teacher = ReferenceTeacher()
    started = time.perf_counter()
    embeddings = teacher.embed(tiles)
    logger.info("embedded %d tiles with teacher %s in %.0f s", len(tiles), teacher.identity, time.perf_counter() - started)
    np.savez(cache, embeddings=embeddings, paths=np.array(paths), teacher=teacher.identity, licence=teacher.licence)
    return embeddings, teacher.identity, teacher.licence


def write_train_shards(folder: Path, tiles: np.ndarray, embeddings: np.ndarray, indices: np.ndarray, teacher: str, licence: str) -> None:
    """Write the train tiles as one shard, each with its own made-up slide id ``tile-<row in labels.csv>``."""
    write_shard(
        folder / shard_name(0),
        tiles=tiles[indices],
        embeddings=embeddings[indices],
        teacher=teacher,
        teacher_licence=licence,
        slide_ids=[f"tile-{index}" for index in indices],
    )


def recipe_config(recipe: str, shard_dir: Path, out_dir: Path, presentations: int, train_tiles: int, seed: int) -> DistillConfig:
    """Build the DistillConfig of ``recipe`` whose ``max_steps`` x batch size equals ``presentations``."""
    if recipe == "original":
        config = DistillConfig(shard_dir, out_dir, loss="unite", batch_size=ORIGINAL_BATCH_SIZE, augmentations=[], seed=seed, val_fraction=0.0)
    else:
        config = DistillConfig(shard_dir, out_dir, seed=seed, val_fraction=0.0)
    if presentations % config.batch_size != 0:
        raise SystemExit(f"--presentations is {presentations}, expected a multiple of batch size {config.batch_size} so both recipes see the same number.")
    if config.batch_size > train_tiles:
        raise SystemExit(f"{train_tiles} train tiles, fewer than the {recipe} batch size {config.batch_size}. Lower --held-out-fraction.")

    # distill drops each epoch's last partial batch, so an epoch is train_tiles // batch_size steps.
    config.max_steps = presentations // config.batch_size
    config.epochs = math.ceil(config.max_steps / (train_tiles // config.batch_size))
    config.checkpoint_every_n_steps = max(1, config.max_steps // CHECKPOINTS_PER_RUN)
    if (out_dir / "lightning" / "last.ckpt").exists():
        config.resume_from = "last"
    return config


def run_recipe(recipe: str, config: DistillConfig) -> float | None:
    """Distill one recipe unless its student is already exported; return the wall time in seconds, or None when skipped."""
    if (config.out_dir / "student" / "config.json").exists():
        logger.info("%s: student already exported in %s, not training again", recipe, config.out_dir / "student")
        return None
    logger.info("%s: %d steps of batch %d (%d epochs), resume from %s", recipe, config.max_steps, config.batch_size, config.epochs, config.resume_from)
    started = time.perf_counter()
    result = distill(config, progress=False, command=f"benchmarks/recipes.py, recipe {recipe}")
    elapsed = time.perf_counter() - started
    logger.info("%s: %d steps in %.0f s, train loss %.4f -> %.4f", recipe, result.steps, elapsed, result.first_loss, result.last_loss)
    return elapsed


def student_from_lightning_checkpoint(path: Path, student: str) -> tuple[torch.nn.Module, int]:
    """Load the student weights of a Lightning checkpoint written by ``distill``; return the model in eval mode and its global step."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    prefix = "student."
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    model = build_student(student)
    model.load_state_dict(state)
    return model.eval(), int(checkpoint["global_step"])


@torch.no_grad()
def student_embeddings(model: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    """Embed ``tiles`` with ``model`` in float32 through timm's ``forward_head(pre_logits=True)``."""
    outputs = []
    for start in range(0, len(tiles), EMBED_BATCH_SIZE):
        images = torch.from_numpy(to_model_input(tiles[start : start + EMBED_BATCH_SIZE]))
        outputs.append(model.forward_head(model.forward_features(images), pre_logits=True).float().numpy())
    return np.concatenate(outputs)


def probe_balanced_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, resamples: int, seed: int
) -> dict[str, float]:
    """Fit a standardised logistic-regression probe on the train embeddings; return its held-out balanced accuracy.

    The 95% interval resamples the held-out tiles' predictions; the probe itself is fit once.
    """
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=10000, class_weight="balanced"))
    probe.fit(train_x, train_y)
    accuracy = bootstrap_interval(balanced_accuracy_score, test_y, probe.predict(test_x), n=resamples, seed=seed)
    return {
        "probe_balanced_accuracy": accuracy.estimate,
        "probe_balanced_accuracy_low": accuracy.low,
        "probe_balanced_accuracy_high": accuracy.high,
    }


def agreement(teacher: np.ndarray, student: np.ndarray, k: int, resamples: int, seed: int) -> dict[str, float]:
    """Return k-NN overlap and linear CKA of ``student`` with ``teacher``, each with a 95% bootstrap interval."""
    # Bootstrap the per-tile overlaps, because a resample that repeats a tile makes it its own neighbour.
    per_tile = knn_overlap_per_tile(teacher, student, k=k)
    overlap = bootstrap_interval(np.mean, per_tile, n=resamples, seed=seed)
    cka = bootstrap_interval(linear_cka, teacher, student, n=resamples, seed=seed)
    return {
        "knn_overlap": overlap.estimate,
        "knn_overlap_low": overlap.low,
        "knn_overlap_high": overlap.high,
        "cka": cka.estimate,
        "cka_low": cka.low,
        "cka_high": cka.high,
    }


def parse_checkpoints(values: list[str]) -> dict[str, Path]:
    """Parse ``RECIPE=PATH`` values of --evaluate-checkpoint into a dict, checking the names and that the files exist."""
    checkpoints = {}
    for value in values:
        recipe, separator, path = value.partition("=")
        if not separator or recipe not in RECIPES or not Path(path).is_file():
            raise SystemExit(
                f"--evaluate-checkpoint {value!r} is invalid, expected RECIPE=PATH with RECIPE in {list(RECIPES)} and an existing checkpoint file."
            )
        checkpoints[recipe] = Path(path)
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="folder with labels.csv (columns path, label) and the tiles it lists")
    parser.add_argument("--out", type=Path, required=True, help="output folder: shards, one run folder per recipe, results.json")
    parser.add_argument("--presentations", type=int, default=2048, help="tile presentations per recipe, a multiple of 64 (default: 2048)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated recipes to run, of {','.join(RECIPES)} (default: both)")
    parser.add_argument("--held-out-fraction", type=float, default=0.3, help="fraction of each class held out for evaluation (default: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the students and the bootstrap (default: 0)")
    parser.add_argument("--k", type=int, default=10, help="neighbours in the k-NN overlap (default: 10)")
    parser.add_argument("--resamples", type=int, default=100, help="bootstrap resamples (default: 100)")
    parser.add_argument(
        "--evaluate-checkpoint",
        action="append",
        default=[],
        metavar="RECIPE=PATH",
        help="evaluate the student in this Lightning checkpoint of RECIPE instead of training it (repeatable), for a run stopped early",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    recipes = [name.strip() for name in args.recipes.split(",")]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes contains {unknown}, expected names from {list(RECIPES)}.")
    args.out.mkdir(parents=True, exist_ok=True)

    tiles, labels, paths = load_labelled_tiles(args.tiles)
    embeddings, teacher, licence = teacher_embeddings(tiles, paths, args.out / "teacher.npz")
    train, held_out = train_test_split(np.arange(len(tiles)), test_size=args.held_out_fraction, stratify=labels, random_state=args.seed)
    train, held_out = np.sort(train), np.sort(held_out)
    shard_dir = args.out / "shards"
    write_train_shards(shard_dir, tiles, embeddings, train, teacher, licence)
    logger.info("%d train and %d held-out tiles, stratified by class; train shards in %s", len(train), len(held_out), shard_dir)

    results: dict[str, dict] = {
        "teacher": {
            "identity": teacher,
            **probe_balanced_accuracy(embeddings[train], labels[train], embeddings[held_out], labels[held_out], args.resamples, args.seed),
        },
        "setup": {
            "train_tiles": len(train),
            "held_out_tiles": len(held_out),
            "presentations": args.presentations,
            "seed": args.seed,
            "k": args.k,
            "knn_overlap_chance": knn_overlap_chance(len(held_out), args.k),
            "resamples": args.resamples,
            "torch_threads": torch.get_num_threads(),
        },
    }
    checkpoints = parse_checkpoints(args.evaluate_checkpoint)
    for recipe in recipes:
        config = recipe_config(recipe, shard_dir, args.out / recipe, args.presentations, len(train), args.seed)
        if recipe in checkpoints:
            # A stopped run's learning rate had not decayed to 0, so the record stores the steps it completed.
            model, steps = student_from_lightning_checkpoint(checkpoints[recipe], config.student)
            elapsed = None
            logger.info("%s: evaluating %s at step %d of %d", recipe, checkpoints[recipe], steps, config.max_steps)
        else:
            elapsed = run_recipe(recipe, config)
            model, steps = load_student(config.out_dir / "student").model, config.max_steps
        student = student_embeddings(model, tiles)
        results[recipe] = {
            "batch_size": config.batch_size,
            "steps": steps,
            "planned_steps": config.max_steps,
            "presentations": steps * config.batch_size,
            "checkpoint": str(checkpoints.get(recipe, config.out_dir / "student")),
            "loss": config.loss,
            "augmentations": config.augmentations,
            "wall_seconds": elapsed,
            **probe_balanced_accuracy(student[train], labels[train], student[held_out], labels[held_out], args.resamples, args.seed),
            **agreement(embeddings[held_out], student[held_out], args.k, args.resamples, args.seed),
        }
        logger.info("%s: %s", recipe, json.dumps(results[recipe]))
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
