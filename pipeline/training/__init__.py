"""Training of the CellSAM model (one home for every training loop; see docs/model.md).

- :mod:`pipeline.training.train`: supervised training / fine-tuning of the dense heads (``cellsam train``);
- :mod:`pipeline.training.distill`: SAM-teacher distillation and dual-mode training (``cellsam distill``);
- :mod:`pipeline.training.refine_train`: the SAM prompt-encoder + mask-decoder refiner (``cellsam distill --refiner``);
- :mod:`pipeline.training.loop`: shared optimiser/schedule, step, weight EMA, the resumable loop and the
  run state (``last.pt``, compact ``--resume-state`` file).

This package imports :mod:`pipeline.model`; :mod:`pipeline.model` (inference) never imports it.
"""
