"""What `safejax demo` runs, from configs/demo/full.gin or quick.gin (each field documented there).

Read once at the start into a frozen dataclass: every stage then parses its own gin config
(gin holds one config at a time), so the demo's settings must not live in gin while they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DemoConfig:
    mode: str = "full"
    # classifier
    classifier_gin: Sequence[str] = ("demo/classifier.gin",)
    # corpus (corpus.py): characters per source, longest document, snippets per labeled "thread"
    corpus_chars: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max_document_chars: int = 6000
    snippets_per_document: int = 16
    min_snippet_score: int = 3
    corpus_seed: int = 0
    held_out_clean_documents: int = 20  # perplexity's clean text (corpus.write_held_out_clean)
    # scoring
    score_batch_size: int = 32
    score_dtype: str = "bfloat16"  # as `safejax score`; "float32" for the export's full precision
    score_rule: str | None = None  # None: the export's (calibrated); "max": the paper's highest window
    split_bindings: Sequence[str] = ()  # e.g. split_by_score.score_field (data/split.py)
    # synthesis
    synth_gin: Sequence[str] = ()
    # pretraining: the model file, the two ablation files, bindings both share
    lm_gin: str = "lm/tiny.gin"
    lm_bindings: Sequence[str] = ()
    raw_ablation: str = "ablations/raw.gin"
    safe_ablation: str = "ablations/full.gin"
    # benign finetuning
    finetune_gin: Sequence[str] = ("finetune/gsm8k.gin",)
    finetune_bindings: Sequence[str] = ()
    # evaluation
    eval_bindings: Sequence[str] = ()
    decodings: Sequence[str] = ("greedy", "beam", "safebeam", "randomdrop")
    suites: Sequence[str] = ("safety", "toxicity", "refusal", "utility")
    judges: Sequence[str] = ("classifier", "profanity", "refusal")
    limit: int | None = None


def load(gin_files: Sequence[str], bindings: Sequence[str]) -> DemoConfig:
    from safejax import config

    config.parse(gin_files, bindings)
    return DemoConfig()
