"""What a training run costs per device: the bytes of its state under the mesh's shardings, the
compiled step's peak memory and FLOPs (from XLA's own analysis of the program), and the
achieved TFLOP/s and model FLOPs utilisation (MFU) once steps are timed.

Everything here reads shapes, shardings and compiled programs; nothing is allocated, so the
same report comes from an abstract compile (`ddx info --config`, benchmarks/scale.py) and from
the live run (`ddx train` prints it before its first step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ddx import parallel

# Dense bf16 peak TFLOP/s per chip (TPU) or per GPU, keyed by a substring of
# ``jax.Device.device_kind``; the longest matching key wins. Sources: Google Cloud TPU system
# architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s bf16 per chip); NVIDIA data
# sheets (A100 312; H100 SXM 989 and PCIe 756; H200 989 TFLOP/s bf16 dense, i.e. without
# structured sparsity). float32 matmuls run below these peaks (on TPUs as several bf16
# passes), so a float32 run's MFU against them is a lower bound on how busy the chip is.
PEAK_TFLOPS = {
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,  # v5e's device_kind
  "TPU v5e": 197.0,
  "TPU v5": 459.0,  # v5p's device_kind
  "TPU v5p": 459.0,
  "TPU v6 lite": 918.0,  # v6e's device_kind
  "TPU v6e": 918.0,
  "A100": 312.0,
  "H100": 989.0,
  "H100 PCIe": 756.0,
  "H200": 989.0,
}


def peak_tflops(device_kind: str, given: float | None = None) -> float | None:
  """The per-device peak: ``given`` if set, else the table's entry for ``device_kind`` (None
  when unknown, e.g. a CPU)."""
  if given:
    return float(given)
  hits = [k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()]
  return PEAK_TFLOPS[max(hits, key=len)] if hits else None


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Bytes one device holds of each part of a TrainState (the largest shard of every leaf)."""

  params: int
  ema: int
  optimizer: int
  replicated: int  # params + EMA + optimizer unsharded: what every device holds at fsdp = 1

  @property
  def total(self) -> int:
    return self.params + self.ema + self.optimizer


def state_bytes(state: Any, shardings: Any) -> StateBytes:
  """`StateBytes` of a TrainState (arrays or ShapeDtypeStructs) under ``shardings``
  (a TrainState of NamedSharding, `ddx.training.step.state_shardings`)."""
  parts = (state.params, state.ema_params, state.opt_state)
  full = sum(
    int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(parts)
  )
  return StateBytes(
    params=parallel.device_bytes(state.params, shardings.params),
    ema=parallel.device_bytes(state.ema_params, shardings.ema_params),
    optimizer=parallel.device_bytes(state.opt_state, shardings.opt_state),
    replicated=full,
  )


@dataclasses.dataclass(frozen=True)
class CompiledStats:
  """XLA's analysis of one compiled call of the train function (per device: the program each
  device runs). ``flops`` covers the whole call (all its steps)."""

  # arguments + outputs + temporaries - donated arguments reused as outputs: the device memory
  # the call needs, by XLA's buffer assignment (an upper bound: not all temporaries are live at
  # once; XLA:CPU's own peak_memory_in_bytes field can read below the temporaries)
  peak_bytes: int
  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # donated arguments reused as outputs
  flops: float


def compiled_stats(compiled) -> CompiledStats:
  """From a ``jax.stages.Compiled`` (``jitted.lower(...).compile()``)."""
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return CompiledStats(
    peak_bytes=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
    temp_bytes=int(m.temp_size_in_bytes),
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    flops=float((cost or {}).get("flops", 0.0)),
  )


def achieved(flops_per_step: float, steps_per_sec: float, peak: float | None) -> dict:
  """``{"tflops_per_device": ..., ["mfu": ...]}`` for a per-device ``flops_per_step`` run at
  ``steps_per_sec`` (MFU only when ``peak`` TFLOP/s is known)."""
  tflops = flops_per_step * steps_per_sec / 1e12
  out = {"tflops_per_device": tflops}
  if peak:
    out["mfu"] = tflops / peak
  return out


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


def format_report(
  sb: StateBytes, cs: CompiledStats | None, *, steps_per_call: int, mesh_shape: dict, device_kind: str, peak=None
) -> list[str]:
  """The start-of-run lines: per-device state bytes, compiled peak memory and FLOPs per step."""
  lines = [
    f"mesh {mesh_shape}; state per device: params {_gib(sb.params)}, EMA {_gib(sb.ema)}, optimizer "
    f"{_gib(sb.optimizer)} = {_gib(sb.total)} (unsharded {_gib(sb.replicated)})"
  ]
  if cs is not None:
    per_step = cs.flops / max(steps_per_call, 1)
    peak_txt = f"{peak:g} TFLOP/s peak" if peak else "peak unknown (set parallel.peak_tflops for MFU)"
    lines.append(
      f"compiled step per device: memory {_gib(cs.peak_bytes)} (temporaries {_gib(cs.temp_bytes)}), "
      f"{per_step / 1e9:.4g} GFLOP per step; {device_kind}: {peak_txt}"
    )
  return lines
