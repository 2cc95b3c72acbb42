"""Training: the pure train step, the loop around it, checkpoints and the run log.

* `ddx.training.step`: the train state, optimizer, EMA and the jitted, sharded train step;
* `ddx.training.loop`: data, steps, logging, sample grids, evaluation, checkpoints, preemption;
* `ddx.training.checkpoint`: the workdir layout and orbax checkpoints with per-leaf checksums;
* `ddx.training.run_log`: ``metrics.jsonl`` and TensorBoard events;
* objectives besides the diffusion loss: `ddx.training.autoencoder` (the KL autoencoder of
  latent diffusion) and `ddx.training.classifier` (a noisy classifier for classifier guidance).
"""
