"""seqio Tasks (one per data kind) and Mixtures (one per ablation of the paper), from gin.

Data kinds, each a Task (names take an optional prefix):

    raw                  every corpus document
    raw_tagged           every corpus document, those scored in TAG_SCORES carrying harm tags
    score_0              documents scored 0 (safe)
    score_1_3            documents scored 1-3 (the ones the paper rephrases)
    score_4_5            documents scored 4-5 (the ones RefuseWeb turns into refusals)
    score_1_3_tagged     score_1_3 with harm tags (documents scored in TAG_SCORES)
    score_4_5_tagged     score_4_5 with harm tags
    rephrased            rephrased records written by the synthesis step (JSONL, `text`)
    refuseweb            RefuseWeb dialogues (JSONL, `turns`), formatted by data/dialogue.py
    moral_education      moral-education articles (JSONL, `text`)

Mixtures `ablation_raw`, `ablation_score0`, `ablation_rephrase`, `ablation_refusal`,
`ablation_moral`, `ablation_tags`, `ablation_full` list their kinds in gin
(configs/data/safety.gin), each kind with a rate. A kind whose inputs are not configured is not
registered, and neither are the mixtures that need it; `unavailable()` says why.

The score kinds (raw_tagged, score_*) read either the corpus joined with the score shards by id,
each task reading the whole corpus to keep its range, or the corpus written once into score
folders by `safejax data split` (data/split.py), each task reading only its own documents.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import gin
import seqio

from safejax import errors
from safejax import vocab as vocab_lib
from safejax.data import dialogue, mixing, sources, split
from safejax.data import scores as scores_lib
from safejax.data import preprocessors as pre
from safejax.safety import tagging


ABLATIONS = {
    "ablation_raw": ("raw",),
    "ablation_raw_tagged": ("raw_tagged",),  # all raw data, tags in unsafe-scored documents only
    "ablation_score0": ("score_0",),
    "ablation_rephrase": ("score_0", "rephrased"),
    "ablation_refusal": ("score_0", "rephrased", "refuseweb"),
    "ablation_moral": ("score_0", "rephrased", "refuseweb", "moral_education"),
    "ablation_tags": ("score_0", "rephrased", "score_1_3_tagged", "score_4_5_tagged"),
    "ablation_full": ("score_0", "rephrased", "refuseweb", "moral_education",
                      "score_1_3_tagged", "score_4_5_tagged"),
}

_unavailable: dict[str, str] = {}


# --- sources, as gin-configurable factories --------------------------------------------------

@gin.configurable
def jsonl_source(files: Sequence[str] | None = None, validation_permille: int = 20,
                 kind: str = "text") -> sources.JsonlDataSource:
    """JSONL(.gz) files (globs allowed); the bundled corpus when no files are given."""
    files = sources.expand_files(files) if files else sources.bundled_corpus_files()
    return sources.JsonlDataSource(files, validation_permille, kind)


@gin.configurable
def tfrecord_source(files: Sequence[str] = gin.REQUIRED, validation_permille: int = 20,
                    text_feature: str = "text", id_feature: str = "id",
                    compression: str = "") -> sources.TfrecordDataSource:
    return sources.TfrecordDataSource(sources.expand_files(files), validation_permille,
                                      text_feature, id_feature, compression)


@gin.configurable
def tfds_source(name: str = gin.REQUIRED, data_dir: str | None = None, tfds_split: str = "train",
                text_feature: str = "text", id_feature: str | None = None,
                validation_permille: int = 20) -> sources.TfdsTextSource:
    return sources.TfdsTextSource(name, data_dir, tfds_split, text_feature, id_feature,
                                  validation_permille)


# --- tasks ------------------------------------------------------------------------------------

def _register(name: str, source: seqio.DataSource, vocabulary, document_steps: list,
              shuffle_buffer_size: int) -> str:
    """Registers (or re-registers) a Task: per-document steps, cache point, chunking."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[*document_steps, pre.drop_raw_text, seqio.CacheDatasetPlaceholder(),
                       pre.split_into_chunks],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name


_tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
MIN_SHUFFLE_BUFFER = 64  # chunks; split_into_chunks already interleaves 64 documents
SCORE_RANGES = {"score_0": (0, 0), "score_1_3": (1, 3), "score_4_5": (4, 5)}


def _score_sources(corpus: seqio.DataSource, score_files: tuple[str, ...],
                   split_dir: str | None) -> dict[str, seqio.DataSource]:
    """What raw_tagged and each score range read: their score folders (each record carrying its
    score) when the corpus was split, else the whole corpus for the join, JSONL lines outside
    the range skipped by their leading id. Folders split train/validation like the corpus."""
    if split_dir:
        permille = corpus.validation_permille

        def folders(low, high):
            return sources.JsonlDataSource(split.score_files(split_dir, low, high), permille, scored=True)

        return {"raw_tagged": folders(0, scores_lib.NUM_SCORES - 1),
                **{kind: folders(*bounds) for kind, bounds in SCORE_RANGES.items()}}
    out = {"raw_tagged": corpus}
    for kind, (low, high) in SCORE_RANGES.items():
        out[kind] = corpus
        if isinstance(corpus, sources.JsonlDataSource):
            out[kind] = corpus.with_line_filter(scores_lib.line_prefilter(score_files, low, high))
    return out


@gin.configurable
def jsonl_lm_task(name: str = "bundled_corpus", files: Sequence[str] | None = None,
                  vocab_path: str = vocab_lib.BUNDLED_VOCAB, validation_permille: int = 20,
                  shuffle_buffer_size: int = 1024) -> str:
    """Registers a plain LM Task over JSONL files (the bundled corpus by default); its name."""
    return _register(name, jsonl_source(files, validation_permille),
                     vocab_lib.load_vocabulary(vocab_path),
                     [pre.text_to_targets, _tokenize], shuffle_buffer_size)


@gin.configurable
def safety_data(corpus: seqio.DataSource | None = None,
                scores: Sequence[str] | None = None,
                split_dir: str | None = None,
                rephrased: Sequence[str] | None = None,
                refuseweb: Sequence[str] | None = None,
                moral_education: Sequence[str] | None = None,
                vocab_path: str = vocab_lib.BUNDLED_VOCAB,
                on_missing_score: str = "error",
                tag_rate: float = 0.05,
                tag_scores: tuple[int, int] = (1, 5),
                tag_seed: int = 0,
                validation_permille: int = 20,
                shuffle_buffer_size: int = 1024,
                rates: dict[str, float] | None = None,
                ablations: dict[str, Sequence[str]] = ABLATIONS,
                extra_ablations: dict[str, Sequence[str]] | None = None,
                prefix: str = "") -> list[str]:
    """Registers every data kind whose inputs are configured, and the ablation mixtures.

    corpus: a source (`@jsonl_source()`, `@tfrecord_source()`, `@tfds_source()`; default the
    bundled corpus); scores: score shard files (data/scores.py), joined by id; split_dir: the
    corpus in score folders (data/split.py), which the score kinds then read instead of the corpus
    and the shards; rephrased, refuseweb, moral_education: JSONL files from the synthesis step;
    shuffle_buffer_size: chunks buffered by the kinds of the largest rate, the others' buffers
    scaled down by their rate (at least 64). Returns the registered names.
    """
    if not 0.0 <= tag_rate <= 1.0:
        raise errors.UserError(f"safety_data.tag_rate must be in [0, 1], got {tag_rate}")
    pre.keep_scores(*tag_scores)  # validates the range
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    corpus = corpus if corpus is not None else jsonl_source(None, validation_permille)
    tag = tagging.tag_preprocessor(tag_rate, tuple(tag_scores), tag_seed)
    _unavailable.clear()
    registered = []

    rates = dict(rates or {})
    top_rate = max(rates.values(), default=0.0)

    def task(kind: str, source, steps: list) -> None:
        # A kind's buffer scales with its rate, so that each spans about the same stretch of the
        # mixed stream: a full buffer for a kind drawn 1 time in 30 would fill (at start, before
        # the first batch) 30 times the chunks it needs.
        share = rates.get(kind, top_rate) / top_rate if top_rate > 0 else 1.0
        buffer = max(MIN_SHUFFLE_BUFFER, round(shuffle_buffer_size * share))
        registered.append(_register(prefix + kind, source, vocabulary,
                                    [pre.mark_kind(kind), *steps], min(buffer, shuffle_buffer_size)))

    text_steps = [pre.text_to_targets, _tokenize]
    task("raw", corpus, text_steps)
    if split_dir or scores:
        score_files = () if split_dir else tuple(sources.expand_files(scores))
        join = [pre.join_scores(score_files, prefix + "scored", on_missing_score)] if score_files else []
        score_sources = _score_sources(corpus, score_files, split_dir)
        task("raw_tagged", score_sources["raw_tagged"], [*join, *text_steps, tag])
        for kind, (low, high) in SCORE_RANGES.items():
            steps = [*join, pre.keep_scores(low, high), *text_steps]
            task(kind, score_sources[kind], steps)
            if low > 0:
                task(kind + "_tagged", score_sources[kind], [*steps, tag])
    else:
        for kind in ("raw_tagged", "score_0", "score_1_3", "score_4_5", "score_1_3_tagged",
                     "score_4_5_tagged"):
            _unavailable[prefix + kind] = ("needs score shards or score folders: set safety_data.scores "
                                         "or safety_data.split_dir")
    synthetic = {"rephrased": (rephrased, "text", text_steps),
                 "refuseweb": (refuseweb, "dialogue", [dialogue.format_dialogues]),
                 "moral_education": (moral_education, "text", text_steps)}
    for kind, (files, record_kind, steps) in synthetic.items():
        if files:
            source = sources.JsonlDataSource(sources.expand_files(files), validation_permille, record_kind)
            task(kind, source, steps)
        else:
            _unavailable[prefix + kind] = f"needs the synthesis step's records: set safety_data.{kind}"

    for mixture, kinds in {**ablations, **(extra_ablations or {})}.items():  # a config adds one mixture
        missing = [prefix + k for k in kinds if prefix + k not in registered]
        if missing:
            _unavailable[prefix + mixture] = f"needs task {missing[0]} ({_unavailable.get(missing[0], 'unknown kind')})"
            continue
        unrated = [k for k in kinds if rates.get(k, 0) <= 0]
        if unrated:
            raise errors.UserError(f"safety_data.rates has no positive rate for {unrated[0]!r} "
                                   f"(used by {mixture})")
        mixing.register_mixture(prefix + mixture, [(prefix + k, rates[k]) for k in kinds])
        registered.append(prefix + mixture)
    return registered


def unavailable() -> dict[str, str]:
    """Kinds and mixtures the last `safety_data` call could not register, with the reason."""
    return dict(_unavailable)


@gin.configurable
def safety_mixture(name: str = gin.REQUIRED) -> str:
    """Registers the safety data (from gin) and returns `name`, a clear error if it cannot exist."""
    registered = safety_data()
    if name not in registered:
        reason = _unavailable.get(name) or f"choose from {', '.join(registered)}"
        raise errors.UserError(f"data {name!r} is not available: {reason}")
    return name
