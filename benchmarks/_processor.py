"""One line naming the processor a benchmark ran on: model name, family/model numbers (the
marketing name of a cloud CPU is often just "AMD EPYC"), cores JAX can use, and the vector
extensions that decide CPU kernels (AVX2, AVX-512, AVX512-BF16, AMX)."""

from __future__ import annotations

import os
import platform

_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))


def _cpuinfo() -> dict[str, str]:
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
  except OSError:
    pass
  return info


def describe() -> str:
  """E.g. ``AMD EPYC (family 25, model 17), 2 cores; AVX2 yes, AVX-512 yes, AVX512-BF16 yes, AMX no``."""
  info = _cpuinfo()
  name = info.get("model name") or platform.processor() or platform.machine()
  ids = f" (family {info['cpu family']}, model {info['model']})" if "cpu family" in info and "model" in info else ""
  flags = set(info.get("flags", "").split())
  isa = ", ".join(f"{label} {'yes' if flag in flags else 'no'}" for flag, label in _ISA) if flags else "flags unknown"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{name}{ids}, {cores} cores; {isa}"


if __name__ == "__main__":
  print(describe())
