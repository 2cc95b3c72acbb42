#!/usr/bin/env bash
# Run a ddx command as N JAX processes on this machine (127.0.0.1 only), K CPU devices each:
# the real multi-controller path (jax.distributed over loopback, gloo CPU collectives).
#
#   launch/local_multihost.sh N K -- python -m ddx train --config=configs/digits.py --workdir=runs/mh
#
# Process 0's output goes to stdout; process i's to $DDX_LOG_DIR/process_i.log (default: a
# temporary directory). If any process fails, the others are stopped and the exit code is
# the first failure's.
# The processes keep any XLA_FLAGS of the caller, with the device count set to K.
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2; exit 2
fi
N=$1; K=$2; shift 3
PORT=${DDX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}
LOG_DIR=${DDX_LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < N; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$K" \
      DDX_COORDINATOR="127.0.0.1:$PORT" DDX_COORDINATOR_BIND="127.0.0.1:$PORT" \
      DDX_NUM_PROCESSES="$N" DDX_PROCESS_ID="$i" \
      "$@" > >(if [ "$i" = 0 ]; then cat; else cat > "$LOG_DIR/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  rc=0; wait "$p" || rc=$?
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; cleanup; fi
done
if [ $status -ne 0 ]; then echo "local_multihost: a process failed (exit $status); logs in $LOG_DIR" >&2; fi
exit $status
