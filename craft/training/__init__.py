"""Training: the Trainer and the parts it wires together, optimizers, schedulers, callbacks and
checkpoint I/O.

`craft.training.run.train(cfg, resume=None)` is the entry point; `craft.training.checkpoint`
reads and writes checkpoints (`load_model` for generation and evaluation). The layout of the
package is described in docs/architecture.md ("Training").
"""
