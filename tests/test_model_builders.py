"""Model builders: exact parameter counts on the meta device, and the student's timm contract on real tiles."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.imaging import decode_image, prepare_tile, to_model_input
from shared.models.student import UNITE_STUDENT_PARAMETERS, build_unite_student
from shared.models.uni2 import UNI2H_EMBED_DIM, UNI2H_PARAMETERS, build_uni2h

LUNG_TILES = Path("tiles") / "lc25000_lung_dedup"
STUDENT_EMBED_DIM = 384
# Parameters allowed to get no gradient from the student's output. None are expected, because the
# student has no class token and no classifier head.
PARAMETERS_WITHOUT_GRADIENT: frozenset[str] = frozenset()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_uni2h_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = build_uni2h()

    assert UNI2H_PARAMETERS == 681_394_176
    assert count_parameters(model) == UNI2H_PARAMETERS
    assert model.num_features == UNI2H_EMBED_DIM


def test_student_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = build_unite_student()

    assert UNITE_STUDENT_PARAMETERS == 18_092_160
    assert count_parameters(model) == UNITE_STUDENT_PARAMETERS
    assert model.num_features == STUDENT_EMBED_DIM


def load_two_lung_tiles(shared_data: Path) -> torch.Tensor:
    """Return two real lung tiles of different classes as a (2, 3, 224, 224) float32 model input."""
    folder = shared_data / LUNG_TILES
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"labelled lung tiles not found at {folder}")
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    first_of_each_class = {}
    for row in rows:
        first_of_each_class.setdefault(row["label"], row)
    chosen = list(first_of_each_class.values())[:2]
    tiles = [prepare_tile(decode_image((folder / row["path"]).read_bytes(), name=row["path"])) for row in chosen]
    return torch.from_numpy(to_model_input(np.stack(tiles)))


@pytest.fixture(scope="module")
def student() -> Iterator[torch.nn.Module]:
    """Yield a randomly initialised student, running torch on one thread meanwhile.

    On a busy 2-core machine, torch's default of one thread per core made the forward and backward
    passes about three times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield build_unite_student().eval()
    finally:
        torch.set_num_threads(threads)


def test_student_embedding_follows_timm_contract(student: torch.nn.Module, shared_data: Path) -> None:
    batch = load_two_lung_tiles(shared_data)

    with torch.no_grad():
        tokens = student.forward_features(batch)
        embedding = student.forward_head(tokens, pre_logits=True)
        output = student(batch)

    assert embedding.shape == (2, STUDENT_EMBED_DIM)
    assert embedding.dtype == torch.float32
    assert torch.isfinite(embedding).all()
    assert torch.equal(embedding, output)
    assert not torch.equal(embedding[0], embedding[1])


def test_every_student_parameter_gets_gradient(student: torch.nn.Module, shared_data: Path) -> None:
    batch = load_two_lung_tiles(shared_data)
    student.zero_grad(set_to_none=True)

    # The timm invariant: a sum of the output reaches every parameter.
    student(batch).sum().backward()
    missing = [name for name, parameter in student.named_parameters() if parameter.grad is None]
    assert set(missing) == PARAMETERS_WITHOUT_GRADIENT, missing

    # That sum proves little: while fc_norm's weight is all ones, its 384 outputs sum to a constant, so
    # every gradient before it is only rounding noise. A fixed random weighting of the outputs must give
    # finite, non-zero gradients everywhere.
    student.zero_grad(set_to_none=True)
    weights = torch.randn(2, STUDENT_EMBED_DIM, generator=torch.Generator().manual_seed(0))
    (student(batch) * weights).sum().backward()
    for name, parameter in student.named_parameters():
        if name in PARAMETERS_WITHOUT_GRADIENT:
            continue
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    student.zero_grad(set_to_none=True)
