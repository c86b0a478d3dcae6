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
from safejax.safety import scoring


class ScoreShards(beam.DoFn):
    def __init__(self, checkpoint: str, output_dir: str, batch_size: int, overlap: int, dtype: str | None):
        self._checkpoint, self._output_dir = checkpoint, output_dir
        self._batch_size, self._overlap, self._dtype = batch_size, overlap, dtype
        self._scorer = None

    def setup(self):
        QUARANTINE.write_to(os.path.join(self._output_dir, f"quarantine-{uuid.uuid4().hex}.jsonl"))
        self._scorer = scoring.DocumentScorer(self._checkpoint, batch_size=self._batch_size,
                                              overlap=self._overlap, dtype=self._dtype)

    def process(self, shard):
        index, path = shard
        yield scoring.score_shard(self._scorer, index, path, self._output_dir)


def score_corpus(checkpoint: str, inputs: Sequence[str], output_dir: str, beam_args: Sequence[str],
                 *, batch_size: int = 64, overlap: int = 32, dtype: str | None = None) -> dict:
    """Runs the pipeline (DirectRunner unless `beam_args` name another); returns a summary."""
    files = sources.expand_files(inputs)
    scoring.check_manifest(output_dir, checkpoint, files)
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline | "shards" >> beam.Create(list(enumerate(files)))
             | "spread" >> beam.Reshuffle()
             | "score" >> beam.ParDo(ScoreShards(checkpoint, output_dir, batch_size, overlap, dtype)))
    return {"output": os.path.abspath(output_dir), "shards": len(files)}
