#!/usr/bin/env bash
# Run the safety-data caching job (`safejax data cache`) on Google Cloud Dataflow.
#
# The job reads the raw corpus, score shards and synthetic records named in the gin config,
# runs every per-document step of the chosen mixture's tasks (validation, score join, filters,
# tokenization, harm tags, dialogue formatting) on the workers, and writes seqio's cache format
# to --cache_dir (a gs:// path). Train on it with
#   --gin.DataConfig.use_cached=True --gin.DataConfig.cache_dirs="('gs://.../cache',)"
# The workers install safejax from --package (a wheel or sdist built with `pip wheel .` or
# `python -m build`), so they run the same code and gin config as this machine.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog --project P --region R --bucket gs://B --package FILE [options] -- DATA_ARGS...

Run 'safejax data cache DATA_ARGS... --cache_dir gs://B/cache -- DATAFLOW_OPTIONS' from here;
the pipeline itself runs on Dataflow workers.

Required:
  --project P        Google Cloud project
  --region R         Dataflow region, e.g. us-central1
  --bucket gs://B    bucket for the cache (gs://B/cache), staging and temp files
  --package FILE     safejax wheel or sdist the workers install (extra_package)

Options:
  --workers N        maximum number of workers (default 32)
  --machine TYPE     worker machine type (default n2-standard-8)
  --job NAME         Dataflow job name (default safejax-cache-<date>)
  --dry-run          print the command and exit
  -h, --help         show this help

Dataflow options passed to Beam (all documented by Apache Beam's PipelineOptions):
  --runner=DataflowRunner --project --region --temp_location=gs://B/tmp
  --staging_location=gs://B/staging --max_num_workers --worker_machine_type
  --extra_package --job_name --experiments=use_runner_v2

Example:
  $prog --project my-proj --region us-central1 --bucket gs://my-bucket \\
    --package dist/safejax-0.1.0-py3-none-any.whl -- \\
    ablation_full --gin_file=configs/data/safety.gin --gin.SCORES="['gs://my-bucket/scores/*']"
USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

project='' region='' bucket='' package='' workers=32 machine=n2-standard-8
job="safejax-cache-$(date +%Y%m%d-%H%M%S)" dry_run=0 saw_separator=0
while (($#)); do
  case $1 in
    --project) need_value "$@"; project=$2; shift 2 ;;
    --region) need_value "$@"; region=$2; shift 2 ;;
    --bucket) need_value "$@"; bucket=${2%/}; shift 2 ;;
    --package) need_value "$@"; package=$2; shift 2 ;;
    --workers) need_value "$@"; workers=$2; shift 2 ;;
    --machine) need_value "$@"; machine=$2; shift 2 ;;
    --job) need_value "$@"; job=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) saw_separator=1; shift; break ;;
    *) die "unknown option $1 (data arguments go after --)" ;;
  esac
done
((saw_separator)) || die "missing -- before the data arguments (mixture name, gin flags)"
(($#)) || die "no data arguments after -- (at least the mixture or task name)"
[[ -n $project ]] || die "--project is required"
[[ -n $region ]] || die "--region is required"
[[ $bucket == gs://* ]] || die "--bucket must be a gs:// path"
[[ -n $package ]] || die "--package is required (build one with: pip wheel --no-deps -w dist .)"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"

cmd=(safejax data cache "$@" --cache_dir "$bucket/cache" --
     --runner=DataflowRunner "--project=$project" "--region=$region"
     "--temp_location=$bucket/tmp" "--staging_location=$bucket/staging"
     "--max_num_workers=$workers" "--worker_machine_type=$machine"
     "--extra_package=$package" "--job_name=$job" --experiments=use_runner_v2)

if ((dry_run)); then
  show "${cmd[@]}"
  exit 0
fi
[[ -f $package ]] || die "--package $package does not exist"
exec "${cmd[@]}"
