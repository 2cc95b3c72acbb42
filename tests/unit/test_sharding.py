"""The training mesh and the sharding rule table (ddx.parallel), the state's shardings
(ddx.training.step.state_shardings) and the per-device report (ddx.training.report): exact
counts from the rules, XLA's FLOPs against closed-form ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddx import parallel
from ddx.cli import config as config_lib
from ddx.cli import defaults
from ddx.training import report
from ddx.training import step as train_lib
from tests._tiny import PixelModel

RULES = parallel.ShardingRules()


def test_param_spec_rules():
  spec = parallel.param_spec
  # below the size threshold, or fsdp = 1: replicated
  assert spec("a/bias", (512,), 8, RULES) == P()
  assert spec("a/kernel", (3, 3, 256, 256), 1, RULES) == P()
  # the largest dimension the axis divides; ties go to the last (output features)
  assert spec("a/kernel", (3, 3, 128, 256), 8, RULES) == P(None, None, None, "fsdp")
  assert spec("a/kernel", (3, 3, 256, 256), 8, RULES) == P(None, None, None, "fsdp")
  assert spec("a/kernel", (1024, 24), 8, RULES) == P("fsdp")
  assert spec("a/kernel", (1000, 40), 16, RULES) == P()  # no dimension divisible: replicated
  assert spec("a/kernel", (1000, 48), 16, RULES) == P(None, "fsdp")  # the divisible one, though smaller
  # overrides come first, in order, matched anywhere in the path
  rules = parallel.ShardingRules(min_size=0, overrides=((r"attn/.*kernel$", None), (r"kernel$", 0)))
  assert spec("mid/attn/qkv/kernel", (256, 768), 8, rules) == P()
  assert spec("down/0/conv/kernel", (16, 3, 3, 8), 8, rules) == P("fsdp")
  assert spec("down/0/conv/bias", (8,), 8, rules) == P("fsdp")  # min_size 0: even small leaves
  assert spec("down/0/conv/kernel", (16, 3, 3, 8), 1, rules) == P()
  with pytest.raises(ValueError, match=r"^parallel.fsdp_overrides: 'kernel\$' splits dimension 0 of a/kernel"):
    spec("a/kernel", (12, 8), 8, rules)
  with pytest.raises(ValueError, match="names dimension 5 of"):
    spec("a/kernel", (8, 8), 8, parallel.ShardingRules(overrides=(("kernel", 5),)))


def test_rules_from_config_and_bad_values():
  cfg = config_lib.to_dict(defaults.get_config())
  cfg["parallel"].update(fsdp_min_size=10, fsdp_overrides=("attn=none", "conv/kernel=-1"))
  assert config_lib.sharding_rules(cfg) == parallel.ShardingRules(10, (("attn", None), ("conv/kernel", -1)))
  for overrides, message in [
    (("attn",), "parallel.fsdp_overrides: entries are 'REGEX=DIM' or 'REGEX=none', got 'attn'"),
    (("attn=x",), "parallel.fsdp_overrides: the dimension in 'attn=x' must be an integer or none"),
    (("(=0",), "parallel.fsdp_overrides: '(' is not a regular expression"),
    (3, "parallel.fsdp_overrides: must be a tuple of 'REGEX=DIM' strings, got 3"),
  ]:
    cfg["parallel"]["fsdp_overrides"] = overrides
    with pytest.raises(ValueError) as e:
      config_lib.sharding_rules(cfg)
    assert str(e.value).startswith(message), str(e.value)
  with pytest.raises(ValueError, match=r"^parallel.fsdp_min_size: must be an integer >= 0, got -1"):
    parallel.ShardingRules(min_size=-1)


def test_make_mesh():
  mesh = parallel.make_mesh(4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert parallel.batch_axes(mesh) == ("data", "fsdp") and parallel.batch_axes(parallel.data_mesh()) == "data"
  # fsdp = 1 orders the devices as the data-parallel mesh does
  assert list(parallel.make_mesh(1).devices.flat) == list(parallel.data_mesh().devices.flat)
  for bad in (0, 3, 16, True, 2.0):
    with pytest.raises(ValueError, match=r"^parallel.fsdp: must be a positive divisor of the 8 devices"):
      parallel.make_mesh(bad)


def _pixel_state():
  tx = train_lib.make_optimizer(train_lib.OptimizerSpec())
  return tx, train_lib.abstract_state(PixelModel, tx, jax.random.key(0), jax.random.key(1))[1]


def test_state_shardings_follow_the_parameters():
  tx, state = _pixel_state()
  mesh = parallel.make_mesh(8)
  sh = train_lib.state_shardings(state, mesh, tx, parallel.ShardingRules(min_size=512))
  specs = {parallel.leaf_path(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh.params)[0]}
  # PixelModel: lin kernel [2, 512], lin bias [512], out kernel [512, 1], out bias [1]
  assert specs == {"lin/bias": P("fsdp"), "lin/kernel": P(None, "fsdp"), "out/bias": P(), "out/kernel": P("fsdp")}
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  adam = sh.opt_state[1][0]
  assert leaves(sh.ema_params) == leaves(adam.mu) == leaves(adam.nu) == leaves(sh.params)
  repl = NamedSharding(mesh, P())
  assert adam.count == sh.opt_state[1][1].count == sh.step == sh.key == repl


def test_device_bytes_shrink_with_fsdp():
  """Exact per-device bytes of params + EMA + Adam moments: the sharded leaves / fsdp, the
  one below min_size whole."""
  tx, state = _pixel_state()
  rules = parallel.ShardingRules(min_size=512)
  got = {}
  for fsdp in (1, 2, 8):
    sh = train_lib.state_shardings(state, parallel.make_mesh(fsdp), tx, rules)
    got[fsdp] = report.state_bytes(state, sh)
  full = 4 * (2 * 512 + 512 + 512 + 1)  # float32 params
  for fsdp, sb in got.items():
    per = 4 * ((2 * 512 + 512 + 512) // fsdp + 1)  # the bias of 1 is replicated
    assert sb.params == sb.ema == per and sb.optimizer == 2 * per + 2 * 4  # two int32 counts
    assert sb.replicated == 4 * full + 2 * 4
  assert got[8].total / got[1].total == pytest.approx(1 / 8, rel=0.01)


def test_report_flops_are_per_device_and_peak_table():
  n, rows = 64, 64
  x = jax.ShapeDtypeStruct((rows, n), jnp.float32)
  w = jax.ShapeDtypeStruct((n, n), jnp.float32)
  one = report.compiled_stats(jax.jit(lambda x, w: x @ w).lower(x, w).compile())
  assert one.flops == 2 * rows * n * n
  mesh = parallel.data_mesh()
  sharded = jax.jit(
    lambda x, w: x @ w,
    in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())),
    out_shardings=NamedSharding(mesh, P("data")),
  )
  eight = report.compiled_stats(sharded.lower(x, w).compile())
  assert eight.flops == 2 * (rows // 8) * n * n  # the program one device runs
  assert eight.argument_bytes == 4 * (rows // 8 * n + n * n) and eight.output_bytes == 4 * rows // 8 * n
  assert report.peak_tflops("TPU v5 lite") == 197 and report.peak_tflops("TPU v5") == 459
  assert report.peak_tflops("NVIDIA H100 PCIe") == 756 and report.peak_tflops("NVIDIA H100 80GB HBM3") == 989
  assert report.peak_tflops("cpu") is None and report.peak_tflops("cpu", 2.5) == 2.5
  a = report.achieved(2e12, 0.5, 4.0)
  assert a["tflops_per_device"] == pytest.approx(1.0) and a["mfu"] == pytest.approx(0.25)
  assert "mfu" not in report.achieved(1e9, 1.0, None)


def test_place_state_keeps_what_is_placed():
  tx, _ = _pixel_state()
  mesh = parallel.make_mesh(2)
  _, state = train_lib.create_state(PixelModel, tx, jax.random.key(0), jax.random.key(1))
  sh = train_lib.state_shardings(state, mesh, tx, parallel.ShardingRules(min_size=512))
  placed = train_lib.place_state(state, sh)
  for x, s in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(sh)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  again = train_lib.place_state(placed, sh)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(placed)))
  _, direct = train_lib.create_state(PixelModel, tx, jax.random.key(0), jax.random.key(1), shardings=sh)
  for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(placed)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
