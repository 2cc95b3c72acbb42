"""What a training step costs per chip at pod scale, from XLA's own analysis of the compiled
step: the SD-1.5 text-conditional U-Net and the DDPM paper's CIFAR-10 U-Net, compiled for 64
fake CPU devices as meshes data x fsdp with fsdp = 1, 8, 16, 64. Nothing is allocated: the
state is abstract (`ddx.training.loop.plan`, the same plan `ddx info --config` prints).

    python benchmarks/scale.py [--models=sd15,cifar10] [--fsdp=1,8,16,64] [--mfu=0.4]

Per model and mesh it prints the bytes of parameters + EMA + Adam moments one device holds,
the compiled step's memory (arguments + outputs + temporaries - donated buffers) and FLOPs
per device, and the steps/s those FLOPs imply on TPU v5e, v5p and H100 at the stated MFU.

* SD-1.5: `UNetCond` with the SD-1.5 shape (859,520,964 parameters), bf16 compute with remat
  (as SD fine-tuning runs), float32 master weights, Adam, EMA; one 64x64x4 latent and a 77x768
  text context per device. The step is this file's text-conditional loss (eps prediction,
  uniform t) through ddx's shared update (`ddx.training.step.apply_gradients`).
* CIFAR-10: `configs/cifar10.py` as trained (float32, no remat), 2 images per device (the
  paper's batch 128 on 64 devices); beside it the paper's own figure, 21 steps/s at batch 128
  on a TPU v3-8, and the MFU that implies by the same FLOP count.

XLA:CPU compiles the program; an accelerator backend fuses differently, so its memory figures
are indicative (the state bytes are exact). The FLOPs count what the program executes, remat's
recomputation included, so "MFU" here is the hardware FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEVICES = 64
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _processor import describe as describe_processor  # noqa: E402
from flax import nnx  # noqa: E402

from ddx import losses, schedules  # noqa: E402
from ddx.cli import config as config_lib  # noqa: E402
from ddx.models import UNet, UNetCond  # noqa: E402
from ddx.models.configs import UNetCondConfig  # noqa: E402
from ddx.training import loop, report  # noqa: E402
from ddx.training import step as train_lib  # noqa: E402

TARGETS = ("TPU v5 lite", "TPU v5p", "H100")  # report.PEAK_TFLOPS keys
DDPM_V3_8 = {"steps_per_sec": 21.0, "batch": 128, "peak_tflops": 4 * 123.0}  # a v3-8: 4 chips x 123 bf16


def _text_step(state, batch, *, graphdef, sched, tx, lr_fn, ema_decay, param_shardings=None):
  """eps-prediction loss of a text-conditional U-Net on latents ``batch["image"]`` with context
  ``batch["context"]`` [B, 77, 768]; the same update as every ddx objective."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  x0 = batch["image"]
  t, eps = losses.draw_noise(sched, x0, jax.random.fold_in(key, 1))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    per_example = losses.noised_loss(lambda x, tt: model(x, tt, batch["context"]), sched, x0, t, eps)
    return jnp.mean(per_example)

  value, grads = jax.value_and_grad(loss_fn)(train_lib.gather_params(state.params, param_shardings))
  grads = train_lib.scatter_grads(grads, param_shardings)
  return train_lib.apply_gradients(state, value, grads, tx=tx, lr_fn=lr_fn, ema_decay=ema_decay, ema_warmup=False)


def _sd15(fsdp: int, optim, spec_kwargs):
  cfg = UNetCondConfig(dtype="bfloat16", remat=True)  # the SD-1.5 shape is the default
  sched = schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  spec = loop.LoopSpec(global_batch_size=DEVICES, fsdp=fsdp, **spec_kwargs)

  def train_fn(mesh, shardings, graphdef, tx):
    return train_lib.make_train_fn(
      mesh,
      1,
      shardings=shardings,
      step_fn=_text_step,
      graphdef=graphdef,
      sched=sched,
      tx=tx,
      lr_fn=train_lib.learning_rate_fn(optim),
      ema_decay=0.9999,
      param_shardings=None if shardings is None else shardings.params,
    )

  return loop.plan(
    lambda rngs: UNetCond(cfg, rngs=rngs),
    image_shape=(64, 64, 4),
    optim=optim,
    loss=None,
    loop=spec,
    train_fn=train_fn,
    batch_extra={"context": ((77, 768), np.float32)},
  )


def _cifar10(fsdp: int, optim, spec_kwargs):
  from configs import cifar10  # noqa: PLC0415 -- the repository's config files are not a package dependency

  cfg = config_lib.validate(cifar10.get_config())
  m = config_lib.model_config(cfg)
  spec = loop.LoopSpec(global_batch_size=2 * DEVICES, fsdp=fsdp, **spec_kwargs)
  return loop.plan(
    lambda rngs: UNet(m, rngs=rngs),
    image_shape=(32, 32, 3),
    optim=config_lib.optimizer_spec(cfg),
    loss=config_lib.loss_spec(cfg),
    loop=spec,
    sched=schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"])),
    num_classes=None,
    use_dropout=True,
  )


MODELS = {
  "sd15": ("SD-1.5 UNetCond, bf16 + remat, 1 latent/device", _sd15),
  "cifar10": ("CIFAR-10 U-Net (DDPM), float32, 2 images/device", _cifar10),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="sd15,cifar10")
  ap.add_argument("--fsdp", default="1,8,16,64")
  ap.add_argument("--mfu", type=float, default=0.4, help="the utilisation the implied step rates assume")
  a = ap.parse_args()
  assert jax.device_count() == DEVICES, jax.device_count()
  optim = train_lib.OptimizerSpec()
  spec_kwargs = dict(seed=0, total_steps=1, ema_decay=0.9999)
  print(f"{describe_processor()}; jax {jax.__version__}; {DEVICES} fake CPU devices; implied rates at MFU {a.mfu:.0%}")
  head = " | ".join(f"steps/s {k}" for k in TARGETS)
  for name in a.models.split(","):
    title, fn = MODELS[name]
    print(f"\n{title}")
    print(f"| mesh (data x fsdp) | state / device | compiled memory / device | GFLOP / step / device | {head} |")
    print("|---|---|---|---|" + "---|" * len(TARGETS))
    for fsdp in (int(f) for f in a.fsdp.split(",")):
      t0 = time.time()
      sb, cs = fn(fsdp, optim, spec_kwargs)
      rates = " | ".join(f"{a.mfu * report.PEAK_TFLOPS[k] * 1e12 / cs.flops:.2f}" for k in TARGETS)
      print(
        f"| {DEVICES // fsdp} x {fsdp} | {sb.total / 1e9:.3f} GB | {cs.peak_bytes / 1e9:.2f} GB | "
        f"{cs.flops / 1e9:,.0f} | {rates} |   ({time.time() - t0:.0f} s to compile)",
        flush=True,
      )
      if name == "cifar10" and fsdp == 1:
        d = DDPM_V3_8
        total = cs.flops * DEVICES * d["batch"] / (2 * DEVICES)  # FLOPs of one step of batch 128
        print(
          f"  the DDPM paper: {d['steps_per_sec']:g} steps/s at batch {d['batch']} on a TPU v3-8 = "
          f"{total * d['steps_per_sec'] / 1e12:.0f} TFLOP/s of its {d['peak_tflops']:.0f} peak "
          f"(MFU {total * d['steps_per_sec'] / 1e12 / d['peak_tflops']:.0%})",
          flush=True,
        )
    print(f"(unsharded state: {sb.replicated / 1e9:.3f} GB per device)")


if __name__ == "__main__":
  main()
