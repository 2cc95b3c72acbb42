"""On-paper scale of the SD-1.5-sized conditional U-Net: parameters, FLOPs and training memory.

Nothing is allocated: parameters come from ``nnx.eval_shape``; the activations a training step
keeps for the backward pass are the residuals JAX's autodiff saves
(``jax.ad_checkpoint.print_saved_residuals``, traced abstractly), minus those that are the
parameters themselves; FLOPs come from XLA's cost analysis of the lowered (uncompiled)
forward pass. With remat, the backward pass also holds one block's recomputed activations
at a time (transient, not counted).

    python benchmarks/sd_scale.py [--batch=1] [--latent=64]

Rows: compute dtype x remat. Memory per device for data parallelism = params + grads + Adam
moments (+ EMA) + saved activations of the per-device batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import UNetCond

SD15 = dict(
  in_channels=4,
  out_channels=4,
  block_out_channels=(320, 640, 1280, 1280),
  down_cross=(True, True, True, False),
  up_cross=(False, True, True, True),
  layers_per_block=2,
  transformer_layers=1,
  num_heads=8,
  cross_attention_dim=768,
  use_linear_projection=False,
  norm_num_groups=32,
  norm_eps=1e-5,
)


_DT = {
  "f32": "float32",
  "bf16": "bfloat16",
  "f16": "float16",
  "s32": "int32",
  "u32": "uint32",
  "bool": "bool",
  "pred": "bool",
  "s8": "int8",
  "u8": "uint8",
  "f64": "float64",
  "s64": "int64",
}


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(batch: int, latent: int, dtype, remat: bool) -> dict:
  model = nnx.eval_shape(lambda: UNetCond(**SD15, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.ShapeDtypeStruct((batch, latent, latent, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((batch, 77, 768), jnp.float32)

  def loss(p, x, t, ctx):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, ctx)))

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(loss, params, x, t, ctx)
  residuals = 0
  for line in buf.getvalue().splitlines():
    m = re.match(r"^(\w+)\[([\d,]*)\]", line)
    if m and "from the argument" not in line:  # parameters are stored anyway
      size = int(np.prod([int(d) for d in m.group(2).split(",") if d]))
      residuals += size * jnp.dtype(_DT[m.group(1)]).itemsize
  flops = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)).lower(params, x, t, ctx).cost_analysis()
  flops = flops.get("flops", float("nan")) if isinstance(flops, dict) else float("nan")
  return dict(
    params=int(sum(np.prod(v.shape) for v in jax.tree.leaves(params))),
    param_bytes=nbytes(params),
    act_bytes=residuals,
    fwd_flops=flops,
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--latent", type=int, default=64)
  a = ap.parse_args()
  print(f"SD-1.5 U-Net, batch {a.batch}, latents {a.latent}x{a.latent}x4, context 77x768")
  print("| compute | remat | params | fp32 params GB | saved activations GB/sample | fwd GFLOP/sample |")
  print("|---|---|---|---|---|---|")
  for dtype in (None, "bfloat16"):
    for remat in (False, True):
      m = measure(a.batch, a.latent, dtype, remat)
      print(
        f"| {dtype or 'float32'} | {remat} | {m['params']:,} | {m['param_bytes'] / 1e9:.2f} | "
        f"{m['act_bytes'] / a.batch / 1e9:.2f} | {m['fwd_flops'] / a.batch / 1e9:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
