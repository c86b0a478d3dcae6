#!/usr/bin/env bash
# Run `safejax train` on one machine using all of its GPUs.
#
# JAX drives every local GPU from a single process, so unlike the TPU pod and
# local multi-process launchers this starts exactly one process. What it adds
# is environment: XLA may take 90% of each GPU's memory up front (unless the
# caller chose another fraction), the latency hiding scheduler is turned on so
# XLA can overlap collectives with compute, and --gpus restricts the run to
# some devices through CUDA_VISIBLE_DEVICES.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog [--gpus 0,1,...] [--dry-run] -- TRAIN_ARGS...

Run 'safejax train TRAIN_ARGS...' once, on all visible GPUs of this machine.

Options:
  --gpus LIST   comma-separated GPU ids; sets CUDA_VISIBLE_DEVICES
  --dry-run     print the environment settings and the command, and exit
  -h, --help    show this help

Environment (kept if already set):
  XLA_PYTHON_CLIENT_MEM_FRACTION  default 0.9
  XLA_FLAGS                       --xla_gpu_enable_latency_hiding_scheduler=true
                                  is appended unless the flag is already there

Example:
  $prog --gpus 0,1,2,3 -- --gin_file=configs/base.gin --workdir=/tmp/run1
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpus='' dry_run=0 saw_separator=0
while (($#)); do
  case $1 in
    --gpus) need_value "$@"; gpus=$2; shift ;;
    --gpus=*) gpus=${1#*=} ;;
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

if ((dry_run)); then
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    show export "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  fi
  show export "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  show export "XLA_FLAGS=$XLA_FLAGS"
  show safejax train "$@"
  exit 0
fi
exec safejax train "$@"
