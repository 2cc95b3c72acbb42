"""EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1): a network F trained and sampled as the denoiser

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / sqrt(σ² + σ_d²),
    c_in = 1 / sqrt(σ² + σ_d²),   c_noise = ln(σ) / 4,

for data of standard deviation σ_d and the variance-exploding sample ``x = x0 + σ n``: the
network's input and target both have unit variance at every σ. Training
(``diffusion.kind="edm"``, `ddx.losses.edm_loss`) draws ln σ ~ N(P_mean, P_std²); sampling
uses ``edm_euler`` / ``edm_heun`` (`ddx.samplers.edm`) on the wrapped network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["coefficients", "precondition"]


def coefficients(sigma: jax.Array, sigma_data: float):
  """``(c_skip, c_out, c_in, c_noise)`` of σ (any shape, float32)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  s2, d2 = sigma * sigma, sigma_data * sigma_data
  return d2 / (s2 + d2), sigma * sigma_data / jnp.sqrt(s2 + d2), 1.0 / jnp.sqrt(s2 + d2), 0.25 * jnp.log(sigma)


def _denoise(net, sigma_data, x, t, y=None):
  c_skip, c_out, c_in, c_noise = (c.reshape((-1,) + (1,) * (x.ndim - 1)) for c in coefficients(t, sigma_data))
  out = net(x * c_in, c_noise.reshape(-1), *(() if y is None else (y,)))
  return c_skip * x + c_out * out.astype(jnp.float32)


def precondition(net, sigma_data: float = 0.5) -> jax.tree_util.Partial:
  """``D(x, t, y=None)``: the x0 prediction of the network ``net(x, t[, y])`` at ``σ = t`` [B]
  (what the edm samplers pass as the timestep). A Partial: an nnx.Module's parameters stay
  traced arguments of the sampling loop."""
  return jax.tree_util.Partial(_denoise, net, float(sigma_data))
