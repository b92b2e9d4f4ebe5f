"""Training: the Trainer loop, optimizers, schedulers, callbacks and checkpoint I/O.

`craft.training.run.train(cfg, resume=None)` is the entry point; `craft.training.checkpoint`
reads and writes checkpoints (`load_model` for generation and evaluation).
"""
