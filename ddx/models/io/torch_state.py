"""Shared mechanics for importing PyTorch (diffusers / transformers) safetensors into NNX modules.

`read_safetensors` is the one reader of weights files (single or sharded, header checked);
`convert_state` fills a ddx parameter dict from what it read.

The networks name their submodules after the reference modules, so a ddx parameter
path maps to a reference tensor name by joining the path with dots, renaming the leaf
(``kernel`` / ``scale`` / ``embedding`` -> ``weight``) and applying a short list of literal
substitutions for the few places where NNX attribute names cannot mirror the reference (e.g.
``ff.net.0.proj``). Tensors are read with ``safetensors.numpy`` only; pickled ``.bin`` files
are never loaded.

Layout: torch conv weights [O, I, kh, kw] become flax kernels [kh, kw, I, O]; linear weights
[O, I] become [I, O]; embeddings and norm affines are copied as they are.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file

# diffusers' pre-0.14 attention parameter names (still in some checkpoints): (new, old) fragments
LEGACY_ATTN = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn."))
LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def read_json(path: str, what: str) -> dict:
  """A JSON object from ``path``; FileNotFoundError / one-line ValueError naming ``what``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: missing {path}")
  try:
    with open(path) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
  if not isinstance(out, dict):
    raise ValueError(f"{what}: {path} must hold a JSON object, got {type(out).__name__}")
  return out


class WeightsNotFoundError(FileNotFoundError, ValueError):
  """A model folder lacks its safetensors weights (catchable as either base class)."""


def read_safetensors(folder: str, names: Iterable[str], what: str) -> dict[str, np.ndarray]:
  """All tensors of the first existing file among ``names`` in ``folder``, or of the shards
  its ``<name>.index.json`` lists; each file's header is checked first (`check_safetensors`).

  Raises:
    WeightsNotFoundError: no such file (or a listed shard is missing); one line naming it.
    ValueError: a damaged file, one line naming ``what``, the file and the tensor.
  """
  names = list(names)
  for name in names:
    single = os.path.join(folder, name)
    index = single + ".index.json"
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      weight_map = read_json(index, what).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{what}: {index} has no weight_map object")
      files = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    else:
      continue
    state = {}
    for fname in files:
      if not os.path.isfile(fname):
        raise WeightsNotFoundError(f"{what}: missing weights shard {fname}")
      check_safetensors(fname, what)
      try:
        state.update(load_file(fname))
      except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{what}: cannot read safetensors file {fname} ({e})") from None
    return state
  hint = ""
  if os.path.isdir(folder) and any(f.endswith(".bin") for f in os.listdir(folder)):
    hint = " (only a pickled .bin is present; re-save it with safe_serialization=True)"
  raise WeightsNotFoundError(f"{what}: missing weights file {os.path.join(folder, names[0])}{hint}")


_SAFETENSORS_ITEMSIZE = {
  "BOOL": 1,
  "U8": 1,
  "I8": 1,
  "F8_E4M3": 1,
  "F8_E5M2": 1,
  "I16": 2,
  "U16": 2,
  "F16": 2,
  "BF16": 2,
  "I32": 4,
  "U32": 4,
  "F32": 4,
  "I64": 8,
  "U64": 8,
  "F64": 8,
}


def check_safetensors(fname: str, what: str) -> None:
  """Check a safetensors file's header against its size (reads only the header): a truncated
  file or a tensor whose byte range does not fit its dtype and shape is a one-line ValueError
  naming ``what``, the file and the tensor (safetensors' own errors name none of them)."""
  size = os.path.getsize(fname)
  where = f"{what}: {fname}"
  with open(fname, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
      raise ValueError(f"{where}: not a safetensors file or truncated inside its header ({size} bytes)")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise ValueError(f"{where}: corrupt safetensors header (not valid JSON)") from None
  if not isinstance(header, dict):
    raise ValueError(f"{where}: corrupt safetensors header (not a JSON object)")
  tensors = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      start, end = (int(o) for o in info["data_offsets"])
      count = int(np.prod([int(d) for d in info["shape"]]))
      itemsize = _SAFETENSORS_ITEMSIZE[info["dtype"]]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{where}: tensor {name}: corrupt safetensors header entry {info!r}") from None
    if end - start != count * itemsize:
      raise ValueError(
        f"{where}: tensor {name}: {info['dtype']}{list(info['shape'])} needs {count * itemsize} bytes, "
        f"the header gives it {end - start}"
      )
    tensors.append((start, end, name))
  for start, end, name in sorted(tensors):
    if 8 + n + end > size:
      raise ValueError(
        f"{where}: tensor {name} is truncated: its data ends at byte {8 + n + end}, the file at "
        f"{size} (an interrupted download or copy?)"
      )


def torch_name(path: tuple, subs: Iterable[tuple[str, str]] = ()) -> str:
  """ddx pure-dict path -> reference tensor name."""
  *mods, leaf = path
  name = ".".join(str(m) for m in mods) + "." + LEAF[leaf]
  name = "." + name
  for old, new in subs:
    name = name.replace(old, new)
  return name[1:]


def convert_state(
  state: Mapping[str, np.ndarray],
  abstract: Mapping,
  *,
  what: str,
  subs: Iterable[tuple[str, str]] = (),
  prefix: str = "",
  legacy: Iterable[tuple[str, str]] = (),
  ignore: Callable[[str], bool] = lambda k: False,
  name_of: Callable[[tuple], str] | None = None,
) -> dict:
  """Fill the ddx pure param dict ``abstract`` (leaves with ``.shape``) from ``state``.

  Args:
    state: reference tensor name -> numpy array.
    abstract: the pure dict (``nnx.to_pure_dict`` of an abstract module).
    what: the component name used in error messages (e.g. ``"vae"``).
    subs: literal substitutions applied to ``"." + dotted path`` (see `torch_name`).
    prefix: prepended to every reference name (e.g. ``"text_model."``).
    legacy: ``(new, old)`` name fragments tried when a name is absent (older checkpoints,
      e.g. diffusers' ``to_q`` -> ``query``).
    ignore: reference names that may be present without a ddx counterpart.
    name_of: ddx path -> reference name, replacing `torch_name` with ``subs`` where a
      rename depends on more than literal fragments.

  Returns:
    A pure dict of float32 numpy arrays with ``abstract``'s structure.

  Raises:
    ValueError: one line naming a missing, unexpected, wrongly-shaped or non-finite tensor.
  """
  subs, legacy = list(subs), list(legacy)
  used = set()

  def fetch(path, like):
    name = prefix + (name_of(path) if name_of is not None else torch_name(path, subs))
    for new, old in legacy:
      if name not in state and new in name and name.replace(new, old) in state:
        name = name.replace(new, old)
    if name not in state:
      raise ValueError(f"{what}: missing tensor {name} in the safetensors weights")
    used.add(name)
    w = np.asarray(state[name], dtype=np.float32)
    if path[-1] == "kernel":
      if w.ndim == 4:
        w = w.transpose(2, 3, 1, 0)
      elif w.ndim == 2:
        w = w.T
    if tuple(w.shape) != tuple(like.shape):
      raise ValueError(
        f"{what}: tensor {name} has shape {tuple(state[name].shape)}, which does "
        f"not give the expected {tuple(like.shape)}"
      )
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
      raise ValueError(f"{what}: tensor {name} has {bad} non-finite values of {w.size}")
    return w

  def walk(node, path):
    if isinstance(node, Mapping):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return fetch(path, node)

  out = walk(abstract, ())
  extra = sorted(k for k in set(state) - used if not ignore(k))
  if extra:
    raise ValueError(f"{what}: {len(extra)} unexpected tensors in the safetensors weights, e.g. {extra[0]}")
  return out
