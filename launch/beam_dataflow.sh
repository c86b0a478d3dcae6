#!/usr/bin/env bash
# Run a safejax Beam job on Google Cloud Dataflow: corpus scoring or the safety-data cache.
#
#   score --beam --checkpoint C --input gs://... --output gs://...
#       scores the corpus with the safety classifier into score shards (each worker loads the
#       model once and scores whole input files);
#   data cache NAME --cache_dir gs://... [--gin_file ... --gin.X=Y]
#       runs every per-document step of the mixture's tasks (validation, score join, filters,
#       tokenization, harm tags, dialogue formatting) and writes seqio's cache format; train on it
#       with --gin.DataConfig.use_cached=True --gin.DataConfig.cache_dirs="('gs://...',)".
#   synth rephrase|refuseweb|moral --beam --input ... --output DIR [--backend endpoint --base_url URL]
#       the synthesis jobs, one input file per worker task into DIR/part-N/, each worker with one
#       client (its own --concurrency requests in flight) to the LLM endpoint, e.g. a vLLM fleet
#       behind one load-balanced URL; DIR must be a filesystem every worker mounts (the cache is
#       append-only files), not gs://.
# The workers install safejax from --package (a wheel built with `pip wheel --no-deps -w dist .`),
# so they run the same code and gin config as this machine.
set -euo pipefail

prog=${0##*/}

usage() {
  cat <<USAGE
Usage: $prog --project P --region R --bucket gs://B --package FILE [options] -- JOB...

Run 'safejax JOB... -- DATAFLOW_OPTIONS' from here, where JOB is 'score --beam ...',
'synth JOB --beam ...' or 'data cache ...'; the pipeline itself runs on Dataflow workers.

Required:
  --project P        Google Cloud project
  --region R         Dataflow region, e.g. us-central1
  --bucket gs://B    bucket for Dataflow's staging and temp files
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

Examples:
  $prog --project my-proj --region us-central1 --bucket gs://my-bucket \\
    --package dist/safejax-0.1.0-py3-none-any.whl -- score --beam \\
    --checkpoint gs://my-bucket/classifier/model --input 'gs://my-bucket/corpus/*.jsonl.gz' \\
    --output gs://my-bucket/scores
  $prog --project my-proj --region us-central1 --bucket gs://my-bucket \\
    --package dist/safejax-0.1.0-py3-none-any.whl -- data cache ablation_full \\
    --cache_dir gs://my-bucket/cache --gin.SCORES="['gs://my-bucket/scores/*']"
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
((saw_separator)) || die "missing -- before the job (score --beam ..., synth JOB --beam ... or data cache ...)"
(($#)) || die "no job after -- (score --beam ..., synth JOB --beam ... or data cache ...)"
case "$1 ${2-}" in
  "score "*|"data cache"|"synth "*) ;;
  *) die "the job must be 'score --beam ...', 'synth JOB --beam ...' or 'data cache ...', got '$*'" ;;
esac
[[ -n $project ]] || die "--project is required"
[[ -n $region ]] || die "--region is required"
[[ $bucket == gs://* ]] || die "--bucket must be a gs:// path"
[[ -n $package ]] || die "--package is required (build one with: pip wheel --no-deps -w dist .)"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"

cmd=(safejax "$@" --
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
