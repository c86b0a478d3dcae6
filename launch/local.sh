#!/usr/bin/env bash
# Run a multi-host `safejax train` job as N CPU processes on this machine.
#
# This is for trying out the multi-host code paths (distributed init, per-host
# data, checkpointing) without a cluster. Each process gets the variables
# safejax reads when JAX cannot discover the cluster by itself: the
# coordinator address, the process count and its own process id. Process 0
# hosts the coordinator on 127.0.0.1:PORT. The processes run side by side;
# if one fails the rest are stopped, since the others would otherwise hang
# waiting for it in a collective.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog --processes N [--port P] [--dry-run] -- TRAIN_ARGS...

Start N 'safejax train TRAIN_ARGS...' processes on the CPU of this machine,
wired together as one multi-host job, and wait for all of them.

Options:
  --processes N  number of processes (hosts) to simulate (required)
  --port P       coordinator port on 127.0.0.1 (default: 12355)
  --dry-run      print the N commands, one per line, and exit
  -h, --help     show this help

Example:
  $prog --processes 2 -- --gin_file=lm/tiny.gin --workdir=/tmp/run1
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

processes='' port=12355 dry_run=0 saw_separator=0
while (($#)); do
  case $1 in
    --processes) need_value "$@"; processes=$2; shift ;;
    --processes=*) processes=${1#*=} ;;
    --port) need_value "$@"; port=$2; shift ;;
    --port=*) port=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; saw_separator=1; break ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
  shift
done

[[ -n $processes ]] || die "--processes is required"
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, not '$processes'"
[[ $port =~ ^[1-9][0-9]*$ ]] && ((port < 65536)) || die "--port must be a port number, not '$port'"
((saw_separator && $# > 0)) || die "no train arguments given (put them after --)"

# Set env_vars to the NAME=VALUE settings of process $1.
set_env_vars() {
  env_vars=(
    "SAFEJAX_COORDINATOR=127.0.0.1:$port"
    "SAFEJAX_NUM_PROCESSES=$processes"
    "SAFEJAX_PROCESS_ID=$1"
    JAX_PLATFORMS=cpu
  )
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    set_env_vars "$i"
    show "${env_vars[@]}" safejax train "$@"
  done
  exit 0
fi

pids=()  # pids[i] is process i while it runs; unset once it has finished

# Each process runs in its own process group (job control on while they
# start), so stopping one also stops anything it spawned.
stop_all() {
  local pid
  ((${#pids[@]})) || return 0
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait || true
  pids=()
}
trap stop_all EXIT
# Being in their own process groups, the processes do not see Ctrl-C from the
# terminal; exiting here runs stop_all for them.
trap 'exit 130' INT
trap 'exit 143' TERM

set -m
for ((i = 0; i < processes; i++)); do
  set_env_vars "$i"
  env "${env_vars[@]}" safejax train "$@" </dev/null &
  pids[i]=$!
done
set +m  # no job status messages from here on

# Poll rather than `wait -n`, which old bash versions (macOS) lack.
while ((${#pids[@]})); do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[i]}" 2>/dev/null && continue
    status=0
    wait "${pids[i]}" || status=$?
    unset 'pids[i]'
    if ((status != 0)); then
      echo "$prog: process $i exited with status $status; stopping the others" >&2
      exit "$status"
    fi
  done
  sleep 0.2
done
