"""The ranges of the numbers a user gives (command-line flags and config keys), in one place.

Each bound is where a value stops meaning anything: past it the run would overflow a
counter, exhaust memory or produce infinities, so a larger value is rejected up front with a
one-line error instead of failing (or silently clamping) later. The config schema
(`ddx.cli.config.validate`) and the commands (`ddx.commands`) both read these.
"""

from __future__ import annotations

# the training step counter is int32 (ddx.training.step.TrainState.step)
MAX_STEP = 2**31 - 1
# jax.random.key takes a C long
MAX_SEED = 2**63 - 1
# samples are drawn in one sharded batch
MAX_SAMPLES = 1 << 20
MAX_BATCH = 1 << 20
# beta schedules are float64 host tables of this length
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIZE = 4096
# DDIM's family needs sigma_t^2 <= 1 - alpha_{t-1}: eta = 1 is the DDPM posterior variance
MAX_ETA = 1.0
# classifier-free guidance scale s in eps_u + s (eps_c - eps_u): 0 is unconditional, 1 conditional
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 100.0
MAX_PROCESSES = 1 << 16
MAX_DEVICES = 1 << 20  # parallel.fsdp
MAX_THREADS = 1024
# edits / fills / interpolants per input: one PNG row each, all drawn in one batch
MAX_PER_INPUT = 4096
# RePaint's plan is a host table of about steps * jump_n_sample model calls
MAX_JUMP_N_SAMPLE = 1000
# --- model config (ddx.models.UNet): past these a U-Net cannot be built in any memory
MAX_CHANNELS = 1 << 14  # image channels, base_channels, head_dim
MAX_CHANNEL_MULT = 64  # base_channels * channel_mult per level
MAX_RES_BLOCKS = 64  # residual blocks per level
MAX_HEADS = 1024
MAX_CLASSES = 1 << 20  # the label embedding table has num_classes + 1 rows
