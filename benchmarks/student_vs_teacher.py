"""Forward throughput of the UNITE student against a UNI2-h-shaped teacher, measured in the same run.

Both models get random weights (UNI2-h's are gated and never downloaded), the same real tiles and the
same preprocessing, under bf16 autocast on the chosen device. The figure that matters is the ratio:
how many times more tiles per second the student embeds than the teacher on this machine.

    python benchmarks/student_vs_teacher.py --tiles ../shared/data/tiles/lc25000_lung_dedup --batch-size 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.imaging import prepare_tile, to_model_input
from shared.models.student import build_unite_student
from shared.models.uni2 import build_uni2h


def load_tiles(folder: Path, count: int) -> np.ndarray:
    """Load ``count`` RGB tiles from the JPEG files of ``folder``, prepared for the models."""
    paths = sorted(folder.rglob("*.jp*g"))[:count]
    if len(paths) < count:
        raise SystemExit(f"{folder} contains {len(paths)} JPEG tiles, expected at least {count}. Pass a larger folder or a smaller --batch-size.")
    return np.stack([prepare_tile(np.asarray(Image.open(path).convert("RGB"))) for path in paths])


def tiles_per_second(model: torch.nn.Module, batch: torch.Tensor, *, device: str, repeats: int) -> float:
    """Time ``repeats`` forward passes after one warm-up pass and return tiles per second."""
    model = model.to(device).eval()
    batch = batch.to(device)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        model(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            model(batch)
        if device == "cuda":
            torch.cuda.synchronize()
    return repeats * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="folder of 224 px JPEG tiles (.jpg or .jpeg, searched recursively)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per model (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()

    torch.manual_seed(0)
    batch = torch.from_numpy(to_model_input(load_tiles(args.tiles, args.batch_size)))

    student = build_unite_student()
    student_rate = tiles_per_second(student, batch, device=args.device, repeats=args.repeats)
    student_parameters = sum(parameter.numel() for parameter in student.parameters())
    del student

    teacher = build_uni2h()
    teacher_rate = tiles_per_second(teacher, batch, device=args.device, repeats=args.repeats)
    teacher_parameters = sum(parameter.numel() for parameter in teacher.parameters())
    del teacher

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, bf16 autocast")
    print(f"UNI2-h-shaped teacher  {teacher_parameters:>11,} parameters  {teacher_rate:8.2f} tiles/s  (baseline)")
    print(f"UNITE student          {student_parameters:>11,} parameters  {student_rate:8.2f} tiles/s  ({student_rate / teacher_rate:.1f}x the teacher)")


if __name__ == "__main__":
    main()
