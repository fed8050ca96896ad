"""Validation of the student's geometry against the teacher's, on held-out slides at the end of every epoch.

The loss measures how well the student fits its training objective, which differs between losses. The
metrics here compare the student's own embedding with the teacher's directly, with no projector, so
every loss is judged alike (``shared.agreement``):

- ``val/knn_overlap``: the mean fraction of each tile's 10 nearest neighbours (cosine) in teacher space
  that are also among its 10 nearest in student space. ``val/knn_chance`` is the value of unrelated spaces.
- ``val/cka``: linear CKA between the two spaces, 1 for the same geometry up to rotation and scale.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from shared.agreement import knn_overlap, knn_overlap_chance, linear_cka

logger = logging.getLogger(__name__)

KNN_K = 10
KNN_METRIC = "cosine"


def agreement_metrics(teacher: np.ndarray, student: np.ndarray, *, k: int = KNN_K, metric: str = KNN_METRIC) -> dict[str, float]:
    """Return k-NN overlap, its chance level, the k used and linear CKA of paired (N, D) embeddings.

    ``k`` is lowered to N - 1 when the validation side has fewer than k + 1 tiles, and the ``knn_k``
    entry records the value used.
    """
    count = len(teacher)
    used_k = min(k, count - 1)
    return {
        "knn_overlap": knn_overlap(teacher, student, k=used_k, metric=metric),
        "knn_chance": knn_overlap_chance(count, used_k),
        "knn_k": float(used_k),
        "cka": linear_cka(teacher, student),
        "tiles": float(count),
    }


class AgreementValidation(Callback):
    """Embeds the validation tiles with ``pl_module.embed`` and logs their agreement with the teacher each epoch.

    The student embeds each validation batch once more after ``validation_step``, under the Trainer's
    precision (bf16 autocast by default). In a distributed run every rank gathers all ranks' embeddings,
    so every rank computes and logs the same values. ``history`` keeps one record per epoch: the epoch, the
    validation loss that the module logged, and the metrics of :func:`agreement_metrics`.
    """

    def __init__(self, *, k: int = KNN_K, metric: str = KNN_METRIC) -> None:
        self.k = k
        self.metric = metric
        self.history: list[dict[str, float]] = []
        self._teacher: list[torch.Tensor] = []
        self._student: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._teacher.clear()
        self._student.clear()

    def on_validation_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        images, targets = batch
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            student = pl_module.embed(images)
        self._student.append(student.detach().float())
        self._teacher.append(targets.detach().float())

    def on_validation_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking or not self._student:
            return
        teacher = _gather_rows(pl_module, torch.cat(self._teacher)).cpu().numpy()
        student = _gather_rows(pl_module, torch.cat(self._student)).cpu().numpy()
        self._teacher.clear()
        self._student.clear()
        if len(teacher) < 2:
            logger.warning("validation epoch %d: %d tile embedded, too few to compare neighbours, so no agreement metrics", trainer.current_epoch, len(teacher))
            return

        metrics = agreement_metrics(teacher, student, k=self.k, metric=self.metric)
        for name in ("knn_overlap", "cka", "knn_chance"):
            # Every rank computed the same value from the gathered embeddings, so averaging across ranks keeps it.
            pl_module.log(f"val/{name}", metrics[name], on_epoch=True, prog_bar=name != "knn_chance", sync_dist=True)
        loss = trainer.callback_metrics.get("val/loss")
        record = {"epoch": float(trainer.current_epoch), "loss": None if loss is None else float(loss), **metrics}
        self.history.append(record)
        logger.info(
            "validation epoch %d on %d tiles: loss %s, %d-NN overlap %.4f (chance %.4f), linear CKA %.4f",
            trainer.current_epoch,
            len(teacher),
            "n/a" if loss is None else f"{float(loss):.4f}",
            int(metrics["knn_k"]),
            metrics["knn_overlap"],
            metrics["knn_chance"],
            metrics["cka"],
        )


def _gather_rows(pl_module: lightning.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate the (N_r, D) rows of every rank, where N_r may differ between ranks."""
    trainer = pl_module.trainer
    if trainer.world_size == 1:
        return rows
    counts = pl_module.all_gather(torch.tensor(len(rows), device=rows.device))
    longest = int(counts.max())
    padded = torch.zeros((longest, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[rank, : int(count)] for rank, count in enumerate(counts)])
