"""The editing commands end to end on a tiny 8x8 digits workdir of seeded random weights
(what is checked holds for any weights: shapes, the stored noise, kept pixels, an edit below
one step returning its input): invert, interpolate, edit, inpaint read PNGs (and a mask PNG)
and write PNG grids and .npz files; bad inputs and non-finite outputs stop them with one line
and nothing written."""

import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ddx import guidance
from ddx.cli import main as cli
from tests._tiny import TRAIN_MODEL, random_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("edit_cli")
  wd = random_workdir(str(d / "wd"), **TRAIN_MODEL)
  digits = load_digits().images
  paths = {}
  for i in range(2):
    paths[f"d{i}"] = str(d / f"d{i}.png")
    Image.fromarray(np.round(digits[i] / 16 * 255).astype(np.uint8)).save(paths[f"d{i}"])
  mask = np.full((8, 8), 255, np.uint8)
  mask[4:] = 0  # keep the top half
  paths["mask"] = str(d / "mask.png")
  Image.fromarray(mask).save(paths["mask"])
  paths["grey_mask"] = str(d / "grey.png")
  Image.fromarray(np.full((8, 8), 128, np.uint8)).save(paths["grey_mask"])
  paths["big"] = str(d / "big.png")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(paths["big"])
  paths["rgb"] = str(d / "rgb.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths["rgb"])
  return wd, str(d), paths


def _run(*argv):
  return cli.main(["ddx", *argv])


def _load(prefix):
  assert os.path.isfile(prefix + ".png")
  with np.load(prefix + ".npz") as z:
    return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_invert_interpolate_edit_inpaint(files):
  wd, d, p = files
  two = f"{p['d0']},{p['d1']}"
  assert _run("invert", f"--workdir={wd}", f"--input={two}", "--steps=8", f"--out={d}/inv") == 0
  inv = _load(f"{d}/inv")
  assert inv["latents"].shape == inv["reconstructions"].shape == inv["inputs"].shape == (2, 8, 8, 1)
  np.testing.assert_allclose(inv["inputs"][0, :, :, 0], load_digits().images[0] / 16 * 2 - 1, atol=1.5 / 255)

  assert _run("interpolate", f"--workdir={wd}", "--seeds=3,4", "--num=4", "--steps=5", f"--out={d}/lerp") == 0
  lerp = _load(f"{d}/lerp")
  assert lerp["latents"].shape == lerp["samples"].shape == (4, 8, 8, 1)
  import jax

  np.testing.assert_allclose(
    lerp["latents"][0], np.asarray(jax.random.normal(jax.random.key(3), (1, 8, 8, 1)))[0], atol=1e-6
  )

  assert (
    _run("edit", f"--workdir={wd}", f"--input={p['d0']}", "--strength=0.6", "--num=2", "--steps=5", f"--out={d}/ed")
    == 0
  )
  ed = _load(f"{d}/ed")
  assert ed["edits"].shape == (2, 8, 8, 1) and not np.allclose(ed["edits"][0], ed["edits"][1])
  assert (
    _run("edit", f"--workdir={wd}", f"--input={p['d0']}", "--strength=0.1", "--num=1", "--steps=5", f"--out={d}/ed0")
    == 0
  )  # < 1/S: no step, the input comes back
  np.testing.assert_array_equal(_load(f"{d}/ed0")["edits"], _load(f"{d}/ed0")["inputs"])

  for method in ("repaint",):  # replacement shares the path (tests/unit/test_edit.py covers both)
    assert (
      _run(
        "inpaint",
        f"--workdir={wd}",
        f"--input={two}",
        f"--mask={p['mask']}",
        f"--method={method}",
        "--num=2",
        "--steps=6",
        "--jump_length=2",
        "--jump_n_sample=2",
        f"--out={d}/inp_{method}",
      )
      == 0
    )
    inp = _load(f"{d}/inp_{method}")
    assert inp["fills"].shape == (4, 8, 8, 1)
    kept = np.repeat(inp["inputs"], 2, axis=0)[:, :4]
    np.testing.assert_array_equal(inp["fills"][:, :4], kept)  # DDPM ends at alpha 1: the kept pixels exactly


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["edit", "--input={d0}", "--strength=0"], "--strength"),
    (["edit", "--input={d0}", "--strength=1.5"], "--strength"),
    (["edit", "--input={d0}"], "--strength"),
    (["edit", "--input={big}", "--strength=0.5"], "--input"),
    (["invert", "--input={rgb}"], "--input"),
    (["invert", "--input={d0},/nonexistent.png"], "--input"),
    (["inpaint", "--input={d0}", "--mask={grey_mask}"], "--mask"),
    (["inpaint", "--input={d0}", "--mask={big}"], "--mask"),
    (["inpaint", "--input={d0}", "--mask={mask}", "--method=blend"], "--method"),
    (["inpaint", "--input={d0}", "--mask={mask}", "--sampler=plms"], "--sampler"),
    (["interpolate", "--seeds=1"], "--seeds"),
    (["interpolate", "--seeds=1,2", "--input={d0},{d1}"], "--seeds"),
  ],
)
@pytest.mark.slow
def test_bad_inputs_one_line_nothing_written(files, argv, needle):
  wd, d, p = files
  out = os.path.join(d, "bad")
  with pytest.raises(ValueError) as info:
    _run(argv[0], f"--workdir={wd}", *[a.format(**p) for a in argv[1:]], f"--out={out}")
  msg = str(info.value)
  assert msg.startswith(needle + ":") and "\n" not in msg, msg
  assert not os.path.exists(out + ".png") and not os.path.exists(out + ".npz")


def test_nonfinite_outputs_are_refused(files, monkeypatch):
  """A model whose output turns NaN: the command fails with one line and writes nothing."""
  wd, d, p = files
  real = guidance.for_labels

  def poisoned(*args, **kwargs):
    fn = real(*args, **kwargs)
    return lambda x, t: fn(x, t) * np.float32("nan")

  monkeypatch.setattr(guidance, "for_labels", poisoned)
  out = os.path.join(d, "nan")
  with pytest.raises(ValueError, match="^(edits|fills): .* not finite; nothing written$"):
    _run("edit", f"--workdir={wd}", f"--input={p['d0']}", "--strength=1", "--num=1", "--steps=1", f"--out={out}")
  assert not os.path.exists(out + ".png") and not os.path.exists(out + ".npz")
