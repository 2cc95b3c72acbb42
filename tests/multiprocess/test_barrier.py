"""ddx.parallel.barrier across 2 real JAX processes on 127.0.0.1."""

import textwrap

from tests._tiny import run_processes

# Process 1 reaches the first cross-process collective 35 s after process 0, as when one
# process compiles much more slowly. XLA:CPU's gloo gives peers 30 s to meet at the first
# collective of a device set; without the barrier both processes fail ("Gloo context
# initialization failed": a GetKeyValue timeout on one side, a connect timeout on the other).
_SKEWED_SCRIPT = textwrap.dedent(
  """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    pid, port, meet = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ddx import parallel
    mesh = parallel.data_mesh()
    x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), np.full((1,), pid + 1.0, np.float32))
    total = jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))
    if pid == 1:
      time.sleep(35)
    fn = parallel.compile_then_meet(total, x, name="skewed") if meet else total
    print("SUM", pid, float(fn(x)), flush=True)
    jax.distributed.shutdown()
    """
)


def test_barrier_lets_processes_compile_at_different_speeds():
  for out, code in run_processes(_SKEWED_SCRIPT, "1", timeout=240):
    assert code == 0, out[-3000:]
    assert "SUM" in out and out.split("SUM")[1].split()[1] == "3.0", out[-3000:]


def test_barrier_is_a_no_op_in_one_process():
  from ddx import parallel

  parallel.barrier("alone", timeout_seconds=1)
