#!/usr/bin/env bash
# Run `safejax train` on one machine using all of its GPUs.
#
# JAX drives every local GPU from a single process, so unlike the TPU pod and
# local multi-process launchers this starts exactly one process. What it adds
# is environment: XLA may take 90% of each GPU's memory up front (unless the
# caller chose another fraction), the latency hiding scheduler is turned on so
# XLA can overlap collectives with compute, and --gpus restricts the run to
# some devices through CUDA_VISIBLE_DEVICES. --setup first installs this checkout
# with its CUDA extra (jax[cuda12]: the CUDA plugin built for the pinned jax).
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog [--gpus 0,1,...] [--setup] [--dry-run] -- TRAIN_ARGS...

Run 'safejax train TRAIN_ARGS...' once, on all visible GPUs of this machine.

Options:
  --gpus LIST   comma-separated GPU ids; sets CUDA_VISIBLE_DEVICES
  --setup       first run 'pip install -e REPO[cuda]' for this checkout
                (jax[cuda12] with its CUDA plugin and libraries)
  --dry-run     print the environment settings and the commands, and exit
  -h, --help    show this help

A --dry-run among the train arguments is safejax's: it prints the run's plan
(hosts, mesh, batch, steps, checkpoints, data) and starts nothing.

Environment (kept if already set):
  XLA_PYTHON_CLIENT_MEM_FRACTION  default 0.9
  XLA_FLAGS                       --xla_gpu_enable_latency_hiding_scheduler=true
                                  is appended unless the flag is already there

Examples (the ablation "tags" of the paper at 360M on one 8-GPU node, its plan first):
  $prog --setup -- --gin_file=scale/360m.gin \\
      --gin_file=topology/gpu_8.gin --gin_file=ablations/tags.gin \\
      --gin.SPLIT_DIR="'/data/split'" --gin.REPHRASED="['/data/synth/rephrased/*.jsonl']" \\
      --workdir=/runs/tags-360m --dry-run
  $prog --gpus 0,1,2,3 -- --gin_file=lm/small.gin --workdir=/tmp/run1
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpus='' setup=0 dry_run=0 saw_separator=0
while (($#)); do
  case $1 in
    --gpus) need_value "$@"; gpus=$2; shift ;;
    --gpus=*) gpus=${1#*=} ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; saw_separator=1; break ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
  shift
done

((saw_separator && $# > 0)) || die "no train arguments given (put them after --)"
if [[ -n $gpus && ! $gpus =~ ^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$ ]]; then
  die "--gpus wants a comma-separated list such as 0,1,2,3, not '$gpus'"
fi

if [[ -n $gpus ]]; then export CUDA_VISIBLE_DEVICES=$gpus; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
flag=--xla_gpu_enable_latency_hiding_scheduler
case " ${XLA_FLAGS-} " in
  *" $flag="*) ;;  # the caller already decided
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag=true" ;;
esac

install=(python3 -m pip install -e "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)[cuda]")

if ((dry_run)); then
  if ((setup)); then show "${install[@]}"; fi
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    show export "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  fi
  show export "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  show export "XLA_FLAGS=$XLA_FLAGS"
  show safejax train "$@"
  exit 0
fi
if ((setup)); then "${install[@]}"; fi
exec safejax train "$@"
