"""The distiller: trains the UNITE student from training shards and exports it as a student checkpoint.

Modules: ``split`` (train/validation split by slide, or by spatial block within one slide), ``data`` (a
Dataset over shards), ``loss`` (symmetric InfoNCE with the teacher projector), ``module`` (the Lightning
module) and ``train`` (``DistillConfig`` and ``distill``, the whole run). The package imports only
``shared``, never the teacher gateway or the student server. Nothing is imported here, so that
``distiller.split`` stays usable without loading torch and Lightning.
"""
