"""`safejax score --beam`: corpus scoring as an Apache Beam pipeline (any runner).

Input files are distributed over the workers; each worker loads the classifier once (DoFn setup)
and scores whole files into the same shards, with the same skip-if-done resumption, as the local
path (safety/scoring.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from safejax.data import sources
from safejax.data.quarantine import QUARANTINE
from safejax.safety.classifier_export import read_export_config
from safejax.safety import scoring


class ScoreShards(beam.DoFn):
    def __init__(self, checkpoint: str, output_dir: str, options: dict):
        """`options`: DocumentScorer's keyword arguments (batch_size, overlap, dtype, rule, cascade)."""
        self._checkpoint, self._output_dir, self._options = checkpoint, output_dir, options
        self._scorer = None

    def setup(self):
        QUARANTINE.write_to(os.path.join(self._output_dir, f"quarantine-{uuid.uuid4().hex}.jsonl"))
        self._scorer = scoring.DocumentScorer(self._checkpoint, **self._options)

    def process(self, shard):
        index, path = shard
        yield scoring.score_shard(self._scorer, index, path, self._output_dir)


def score_corpus(checkpoint: str, inputs: Sequence[str], output_dir: str, beam_args: Sequence[str],
                 *, batch_size: int = scoring.SCORE_BATCH_SIZE, overlap: int | None = None, dtype: str | None = scoring.SCORE_DTYPE,
                 rule: str | None = None, cascade: bool = True) -> dict:
    """Runs the pipeline (DirectRunner unless `beam_args` name another); returns a summary."""
    files = sources.expand_files(inputs)
    read_export_config(scoring.model_dir(checkpoint))  # a mistyped --checkpoint must not claim the folder
    scoring.check_manifest(output_dir, checkpoint, files, rule, cascade, dtype)
    options = dict(batch_size=batch_size, overlap=overlap, dtype=dtype, rule=rule, cascade=cascade)
    with beam.Pipeline(options=PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])) as pipeline:
        _ = (pipeline | "shards" >> beam.Create(list(enumerate(files)))
             | "spread" >> beam.Reshuffle()
             | "score" >> beam.ParDo(ScoreShards(checkpoint, output_dir, options)))
    return {"output": os.path.abspath(output_dir), "shards": len(files)}
