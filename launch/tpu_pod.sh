#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: install ddx and start the same command on every worker.
# jax.distributed auto-detects the pod (DDX_DISTRIBUTED=auto); every host reads only its
# slice of each global batch; orbax coordinates checkpoint writes (use a gs:// or shared
# --workdir so every host sees the same checkpoints).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- --config=configs/cifar10.py --workdir=gs://bucket/runs/cifar10
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE [gcloud flags...] -- DDX_TRAIN_FLAGS..." >&2; exit 2
fi
TPU=$1; ZONE=$2; shift 2
GCLOUD_FLAGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do GCLOUD_FLAGS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
REPO=${DDX_REPO:-https://github.com/your-org/ddx.git}
REF=${DDX_REF:-main}
TRAIN_ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" --worker=all --command "
  set -e
  if [ ! -d ddx ]; then git clone $REPO ddx; fi
  cd ddx && git fetch -q && git checkout -q $REF
  python3 -m venv ~/ddx-venv && . ~/ddx-venv/bin/activate
  pip install -q -U pip && pip install -q 'jax[tpu]' -e .
  DDX_DISTRIBUTED=auto python -m ddx train $TRAIN_ARGS
"
