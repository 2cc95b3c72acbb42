"""ddx: denoising diffusion models in JAX/Flax.

Public API (stable names)::

    import ddx
    sched = ddx.schedules.make("linear", num_timesteps=1000)
    sampler = ddx.samplers.make("ddim", sched, num_steps=50, eta=0.0)
    x0 = ddx.sample(model_fn, sampler, x_T, key)
"""

from ddx import diffusion, guidance, losses, samplers, schedules
from ddx.sampling import sample
from ddx.schedules import Schedule

__all__ = ["diffusion", "guidance", "losses", "samplers", "schedules", "sample", "Schedule"]
__version__ = "0.1.0"
