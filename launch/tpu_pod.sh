#!/usr/bin/env bash
# Start `safejax train` on every host of a Cloud TPU pod slice.
#
# A pod slice is a group of TPU VMs, and a multi-host JAX job needs the same
# program running on all of them at the same time. `gcloud ... ssh
# --worker=all` starts a command on every worker in parallel. Nothing else is
# needed for the distributed setup: safejax calls jax.distributed.initialize()
# itself, and on Cloud TPU JAX discovers the coordinator and process ids.
#
# The train arguments are passed through a second shell on each worker, so
# they are re-quoted with printf %q; values with spaces or quotes arrive intact.
# A train --dry-run (the plan, from the config alone) runs on worker 0 only.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog --tpu NAME --zone ZONE [options] -- TRAIN_ARGS...

Run 'safejax train TRAIN_ARGS...' on all workers of the TPU VM slice NAME.

Options:
  --tpu NAME       TPU VM (pod slice) name (required)
  --zone ZONE      its zone, e.g. us-central2-b (required)
  --project P      GCP project (default: the one gcloud is configured with)
  --repo-dir DIR   safejax checkout on the workers (default: safejax);
                   a relative path is taken from the remote home directory
  --setup          first install safejax with its TPU extra on all workers:
                   'pip install -e .[tpu]' in DIR (jax[tpu] and its libtpu)
  --dry-run        print the gcloud commands, one per line, and exit
  -h, --help       show this help

A --dry-run among the train arguments is safejax's: it prints the run's plan
(hosts, mesh, batch, steps, checkpoints, data) on worker 0 and starts nothing.

Examples (the ablation "full" of the paper at 1.7B on a v5p-128, its plan first):
  $prog --tpu my-v5p-128 --zone us-east5-a --setup -- \\
      --gin_file=scale/1_7b.gin --gin_file=topology/tpu_v5p_128.gin \\
      --gin_file=ablations/full.gin --gin.SPLIT_DIR="'gs://bucket/split'" \\
      --gin.REPHRASED="['gs://bucket/synth/rephrased/*.jsonl']" \\
      --gin.REFUSEWEB="['gs://bucket/synth/refuseweb/*.jsonl']" \\
      --gin.MORAL_EDUCATION="['gs://bucket/synth/moral/*.jsonl']" \\
      --workdir=gs://bucket/runs/full-1_7b --dry-run
  $prog --tpu my-v6e-256 --zone us-east5-b -- \\
      --gin_file=scale/360m.gin --gin_file=topology/tpu_v6e_256.gin \\
      --gin_file=ablations/raw.gin --gin.CORPUS="['gs://bucket/corpus/*.jsonl.gz']" \\
      --workdir=gs://bucket/runs/raw-360m
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Shell-quote each argument and join them with spaces.
quote() { local s; printf -v s '%q ' "$@"; printf '%s' "${s% }"; }

tpu='' zone='' project='' repo_dir=safejax setup=0 dry_run=0
saw_separator=0
while (($#)); do
  case $1 in
    --tpu) need_value "$@"; tpu=$2; shift ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone) need_value "$@"; zone=$2; shift ;;
    --zone=*) zone=${1#*=} ;;
    --project) need_value "$@"; project=$2; shift ;;
    --project=*) project=${1#*=} ;;
    --repo-dir) need_value "$@"; repo_dir=$2; shift ;;
    --repo-dir=*) repo_dir=${1#*=} ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; saw_separator=1; break ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
  shift
done

[[ -n $tpu ]] || die "--tpu is required"
[[ -n $zone ]] || die "--zone is required"
((saw_separator && $# > 0)) || die "no train arguments given (put them after --)"

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
if [[ -n $project ]]; then ssh_cmd+=("--project=$project"); fi

workers=--worker=all
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then workers=--worker=0; fi  # the plan is the same on every worker
done

# ssh runs a non-login shell, which may not have pip's user script dir on PATH.
in_repo="export PATH=\"\$HOME/.local/bin:\$PATH\" && cd $(quote "$repo_dir")"

run() {
  if ((dry_run)); then
    show "$@"
  else
    "$@"
  fi
}

if ((setup)); then
  run "${ssh_cmd[@]}" --worker=all "--command=$in_repo && python3 -m pip install -e '.[tpu]'"
fi
run "${ssh_cmd[@]}" "$workers" "--command=$in_repo && safejax train $(quote "$@")"
