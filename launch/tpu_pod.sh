#!/usr/bin/env bash
# Run ddx on every worker of a Cloud TPU VM pod slice, from this checkout.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [gcloud flags, e.g. --project P] [--dry-run] \
#       [--repo URL --ref REF] -- [COMMAND] FLAGS...
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- --config=configs/cifar10.py --workdir=gs://bucket/runs/c10
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- info      # every worker prints the TPU chips it drives
#
# Three gcloud commands, each on all workers (--worker=all):
#   1. copy:    the tracked files of this checkout as they are on disk (uncommitted edits
#               included; untracked files are not, the script names how many) packed with
#               git archive into one tarball, sent with `gcloud compute tpus tpu-vm scp`;
#   2. install: unpack into ~/ddx (replacing what was there), pip install 'jax[tpu]' and ddx with
#               its gs:// client (the [gcs] extra) into ~/ddx-venv;
#   3. run:     cd ~/ddx && DDX_DISTRIBUTED=auto python -m ddx COMMAND FLAGS, on every worker
#               at once. jax.distributed auto-detects the pod; each worker drives its own
#               TPU chips (JAX never restricts local devices on a TPU VM).
# With --repo URL --ref REF (both required, no defaults), step 1 is skipped and step 2 clones
# URL at REF instead. --dry-run prints every command (the local tarball build included)
# instead of running it.
#
# COMMAND is train unless the first flag does not start with "-". Every host reads only its
# slice of each global batch; orbax coordinates checkpoint writes, so use a gs:// or shared
# --workdir that every host sees.
set -euo pipefail
usage() {
  echo "usage: $0 TPU_NAME ZONE [gcloud flags...] [--dry-run] [--repo URL --ref REF] -- [COMMAND] FLAGS..." >&2
  exit 2
}
[ $# -ge 3 ] || usage
TPU=$1; ZONE=$2; shift 2
GCLOUD_FLAGS=(); DRY_RUN=0; REPO=; REF=
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --repo) [ $# -ge 2 ] || usage; REPO=$2; shift ;;
    --repo=*) REPO=${1#--repo=} ;;
    --ref) [ $# -ge 2 ] || usage; REF=$2; shift ;;
    --ref=*) REF=${1#--ref=} ;;
    *) GCLOUD_FLAGS+=("$1") ;;
  esac
  shift
done
[ "${1:-}" = "--" ] || usage
shift
if [ -n "$REPO$REF" ] && { [ -z "$REPO" ] || [ -z "$REF" ]; }; then
  echo "tpu_pod: --repo and --ref go together, got --repo '$REPO' --ref '$REF'" >&2; exit 2
fi
command=train
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then command=$1; shift; fi

show() {  # one line a shell runs as given: plain words bare, the rest in single quotes
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {  # print the command (dry run) or run it
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
}
q() { printf '%q' "$1"; }
VM=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" ${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"} --worker=all)  # (empty-array safe in bash 3.2)
VENV='python3 -m venv ~/ddx-venv && . ~/ddx-venv/bin/activate && pip install -q -U pip'

if [ -z "$REPO" ]; then
  SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  git -C "$SRC" rev-parse --git-dir > /dev/null 2>&1 || {
    echo "tpu_pod: $SRC is not a git checkout; use --repo URL --ref REF" >&2; exit 2; }
  REV=$(git -C "$SRC" rev-parse --short=12 HEAD)
  if [ -n "$(git -C "$SRC" status --porcelain --untracked-files=normal)" ]; then REV=$REV-dirty; fi
  TARBALL=${TMPDIR:-/tmp}/ddx-src-$REV.tar.gz
  REMOTE=ddx-src-$REV.tar.gz
  untracked=$(git -C "$SRC" ls-files --others --exclude-standard | wc -l)
  if [ "$untracked" -gt 0 ]; then
    echo "tpu_pod: $untracked untracked file(s) in $SRC are not shipped (git add them to ship them)" >&2
  fi
  # `git stash create` snapshots the tracked files as they are on disk without touching the
  # checkout (it prints nothing when there are no edits: then HEAD is the snapshot).
  run bash -c 'tree=$(git -C "$1" stash create); git -C "$1" archive --format=tar.gz -o "$2" "${tree:-HEAD}"' \
    _ "$SRC" "$TARBALL"
  run "${VM[@]}" scp "$TARBALL" "$TPU:$REMOTE" "${WHERE[@]}"
  FETCH="rm -rf ~/ddx && mkdir ~/ddx && tar -xzf ~/$REMOTE -C ~/ddx"
else
  FETCH="rm -rf ~/ddx && git clone -q $(q "$REPO") ~/ddx && git -C ~/ddx checkout -q $(q "$REF")"
fi
run "${VM[@]}" ssh "$TPU" "${WHERE[@]}" --command "set -e; $FETCH; $VENV; pip install -q \"jax[tpu]\" -e \"\$HOME/ddx[gcs]\""
ARGS=$(printf ' %q' "$command" "$@")
run "${VM[@]}" ssh "$TPU" "${WHERE[@]}" --command "set -e; cd ~/ddx && . ~/ddx-venv/bin/activate && DDX_DISTRIBUTED=auto python -m ddx$ARGS"
