"""benchmarks/quality_vs_steps.py on a tiny workdir (seeded random weights, no training): the
table, the JSON and the plot are written and hold finite numbers for every planned cell."""

import importlib.util
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

from ddx.cli import config as config_lib
from ddx.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
  spec = importlib.util.spec_from_file_location(
    "quality_vs_steps", os.path.join(ROOT, "benchmarks", "quality_vs_steps.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from ddx.models import UNetConfig, abstract, param_shapes

  sys.path.insert(0, ROOT)
  from configs import digits

  c = digits.get_config()
  c.model.base_channels = 8
  c.model.channel_mult = (1, 2)
  c.model.attention_resolutions = ()
  c.model.norm_num_groups = 4
  cfg = config_lib.validate(c)
  w = str(tmp_path_factory.mktemp("run"))
  shapes = param_shapes(abstract(UNetConfig.from_json(cfg["model"])))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
  checkpoint.save(w, 5, {"params": params, "ema_params": params}, config=cfg)
  return w


def test_plan_runs_the_full_chain_only_for_ddpm_and_ddim():
  mod = _script()
  todo = mod.plan(list(mod.DEFAULT_ROWS), mod.STEPS, 1000)
  assert len(todo) == 3 * 5 + 2 * 4
  every = mod.plan(list(mod.ROWS), mod.STEPS, 1000)
  assert len(every) == 3 * 5 + (len(mod.ROWS) - 3) * 4 and ("heun_karras", 1000) not in every
  assert ("plms", 1000) not in todo and ("dpm_solver++", 1000) not in todo and ("ddpm", 1000) in todo


@pytest.mark.slow
def test_quality_vs_steps_tiny_then_resume_adds_a_column(workdir, tmp_path, capsys):
  mod = _script()
  out = str(tmp_path / "out")
  assert (
    mod.main(
      [
        f"--workdir={workdir}",
        "--num=8",
        "--batch=8",
        "--steps=2,3",
        "--samplers=ddpm,ddim0",
        "--seeds=0,1",
        f"--out={out}",
        f"--cache_dir={tmp_path / 'cache'}",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "[4/4] ddim η=0" in printed and "floor: FD(held-out digits, training digits)" in printed
  assert sorted(os.listdir(out)) == ["quality_vs_steps.json", "quality_vs_steps.md", "quality_vs_steps.png"]
  rec = json.load(open(os.path.join(out, "quality_vs_steps.json")))
  cells = {(r["sampler"], r["steps"], r["seed"]) for r in rec["results"]}
  assert cells == {(r, s, k) for r in ("ddpm", "ddim0") for s in (2, 3) for k in (0, 1)}
  assert all(np.isfinite(r["fd"]) and r["fd"] > 0 and np.isfinite(r["kid_mean"]) for r in rec["results"])
  assert rec["step"] == 5 and np.isfinite(rec["floor"]) and rec["floor"] > 0
  # one x_T per seed: the deterministic samplers differ from each other, and seeds differ
  by = {(r["sampler"], r["steps"], r["seed"]): r["fd"] for r in rec["results"]}
  assert by[("ddim0", 2, 0)] != by[("ddim0", 2, 1)] and by[("ddim0", 2, 0)] != by[("ddpm", 2, 0)]
  md = open(os.path.join(out, "quality_vs_steps.md")).read()
  assert "| ddim η=0 |" in md and " ± " in md and "| ddim η=0 | 13.36 | 6.84 | 4.67 | 4.16 | 4.04 |" in md
  with open(os.path.join(out, "quality_vs_steps.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # --resume with one more S: the measured cells are kept, only the new column is sampled
  capsys.readouterr()
  first = rec["results"]
  argv = [f"--workdir={workdir}", "--num=8", "--batch=8", "--samplers=ddpm,ddim0", "--seeds=0,1", f"--out={out}"]
  assert mod.main([*argv, f"--cache_dir={tmp_path / 'cache'}", "--steps=2,3,4", "--resume"]) == 0
  printed = capsys.readouterr().out
  assert "--resume: 8 measured cell(s) kept" in printed, printed[-2000:]
  sampled = re.findall(r"S=(\d+) +seed", printed)
  assert sampled and set(sampled) == {"4"}, sampled
  rec = json.load(open(os.path.join(out, "quality_vs_steps.json")))
  assert [r for r in rec["results"] if r["steps"] in (2, 3)] == first
  assert {r["steps"] for r in rec["results"]} == {2, 3, 4}


def test_quality_vs_steps_bad_input(workdir, tmp_path):
  mod = _script()
  for args, msg in (
    (["--steps=0"], "--steps: every S must be in [1, 1000]"),
    (["--samplers=k_euler"], "--samplers: must be among"),
    (["--features=inception"], "--inception_weights: required"),
  ):
    with pytest.raises(SystemExit, match=msg.replace("[", r"\[")):
      mod.main([f"--workdir={workdir}", f"--out={tmp_path / 'o'}", *args])
  assert not os.path.exists(tmp_path / "o")
