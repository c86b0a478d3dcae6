"""`safejax synth JOB --beam`: the synthesis jobs as an Apache Beam pipeline, for corpus scale.

Input files are spread over the workers. Each worker builds one Producer (DoFn setup): one HTTP
client with its own `concurrency` requests in flight, or the template backend, and the classifier
once if the gate is on. File i is synthesized by the same code as a local run into its own
directory OUTPUT/part-0000i/, with the same cache: a retried or restarted bundle sends only what
that part lacks. Train on OUTPUT/part-*/rephrased.jsonl (and so on). The cache is append-only files, so OUTPUT
must be a filesystem every worker mounts (NFS, Filestore), not an object store such as gs://.

A vLLM fleet: put the servers behind one OpenAI-compatible URL (a load balancer, or vLLM's own
router) and pass it as --base_url; total requests in flight are workers x --concurrency, so size
--concurrency to what each server batches well (vLLM's --max-num-seqs) divided by the workers
per server.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from safejax.safety import resumable
from safejax.synth import inputs as inputs_lib
from safejax.synth import run as synth
from safejax.synth.jobs import JOBS

PART = "part-{:05d}"
SUMMED = ("kept", "rejected", "invalid", "failed", "inputs", "bad_input", "items", "cached", "requests",
          "tokens_in", "tokens_out")


class SynthesizeFiles(beam.DoFn):
    def __init__(self, settings: synth.Settings, output_dir: str):
        self._settings, self._output_dir = settings, output_dir
        self._producer = None

    def setup(self):
        self._producer = synth.Producer(self._settings)

    def process(self, shard):
        index, path = shard
        if resumable.count_lines([path]) == 0:
            return
        part = os.path.join(self._output_dir, PART.format(index))
        summary = synth.synthesize(self._settings, [path], part, self._producer, part_of_a_whole=True)
        yield summary["kept"]


def synthesize(settings: synth.Settings, inputs: Sequence[str], output_dir: str, beam_args: Sequence[str]) -> dict:
    """Runs the pipeline (DirectRunner unless `beam_args` name another); returns the counts
    summed over every part (each part's own are in its summary.json)."""
    files = inputs_lib.input_files(JOBS[settings.job], inputs, settings.range())
    if settings.classifier:  # a mistyped --classifier fails here, not on every worker
        from safejax.safety.classifier_export import read_export_record
        from safejax.safety.scoring import model_dir

        read_export_record(model_dir(settings.classifier))
    with beam.Pipeline(options=PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])) as pipeline:
        _ = (pipeline | "files" >> beam.Create(list(enumerate(files)))
             | "spread" >> beam.Reshuffle()
             | "synthesize" >> beam.ParDo(SynthesizeFiles(settings, output_dir)))
    total = dict.fromkeys(SUMMED, 0)
    parts = sorted(glob.glob(os.path.join(output_dir, "part-*", "summary.json")))
    for path in parts:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        for name in SUMMED:
            total[name] += summary.get(name, 0)
    return {"job": settings.job, "output": os.path.join(os.path.abspath(output_dir), "part-*", JOBS[settings.job].output),
            "files": len(files), "parts": len(parts), **total}
