"""The distiller: trains a student from training shards and exports it as a student checkpoint.

Modules: ``split`` (train/validation split by slide, or by spatial block within one slide), ``data`` (a
Dataset over shards), ``augment`` (augmentations of the student's view), ``loader`` (seeded, resumable
sampling split across processes), ``loss`` (the distillation losses), ``module`` (the Lightning module),
``validation`` (teacher-student agreement after every epoch), ``licence`` (the teacher-licence check),
``config`` (``DistillConfig``), ``callbacks`` (loss record, ``last.ckpt``, progress bar), ``onnx_export``
(the ONNX export) and ``train`` (``distill``, the whole run). The package imports only ``shared``, never
the teacher gateway or the student server. Nothing is imported here, so that ``distiller.split`` stays
usable without loading torch and Lightning.
"""
