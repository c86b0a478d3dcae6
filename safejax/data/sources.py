"""Corpus readers as seqio DataSources: JSONL(.gz), TFRecord and TFDS, all yielding one shape.

Every source yields {"id", "text", "json"}: the document id (score shards join on it; FILE:LINE
when the record has none), its text, and the whole record as JSON, as read, so that later
preprocessors can read extra fields (dialogue turns, provenance). Malformed records go to the quarantine (data/quarantine.py) with their file and line
and the run goes on.

A held-out split is carved out of the same files by hashing each document id, so the split is
stable whatever the file order, sharding or host count. Hosts read disjoint shards: whole files
when there are at least as many files as hosts, every n-th record otherwise (seqio decides).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from safejax import errors
from safejax.data import conversations
from safejax.data.quarantine import QUARANTINE, raw_text
from safejax.safety.rubric import NUM_SCORES

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED_CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
BUNDLED_PREFIX = "bundled:"  # "bundled:finetune/gsm8k/train.jsonl.gz": a file shipped in safejax/assets
HASH_BUCKETS = 1000
RECORD_KINDS = ("text", "dialogue")  # what a record must carry: a text, or dialogue turns


def bundled_corpus_files() -> list[str]:
    return sorted(glob.glob(os.path.join(BUNDLED_CORPUS_DIR, "*.jsonl.gz")))


def expand_files(patterns: Sequence[str] | str) -> list[str]:
    """Expands globs (local or gs://, or "bundled:PATH" under safejax/assets, so that configs name
    shipped data wherever the package is installed); a pattern that matches nothing is an error
    naming it."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        if pattern.startswith(BUNDLED_PREFIX):
            pattern = os.path.join(ASSETS_DIR, pattern[len(BUNDLED_PREFIX):])
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise errors.UserError(f"corpus file not found: {pattern}")
        files.extend(matches)
    for path in files:
        check_readable(path)
    return files


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator:
    """Local or remote (gs://, any tf.io.gfile path), gzip by the `.gz` suffix; binary or text."""
    binary = "b" in mode
    if not path.endswith(".gz"):
        with tf.io.gfile.GFile(path, mode[0] + ("b" if binary else "")) as f:
            yield f
        return
    with tf.io.gfile.GFile(path, mode[0] + "b") as raw:  # closed after gzip has flushed into it
        with gzip.open(raw, mode[0] + ("b" if binary else "t"), encoding=None if binary else "utf-8") as f:
            yield f


def check_readable(path: str) -> None:
    """Fails early, naming the file, when it cannot be opened or decompressed at all."""
    try:
        with open_file(path) as f:
            f.read(1)
    except (OSError, EOFError, tf.errors.OpError) as e:
        raise errors.UserError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from e


# --- validation, shared by the tf.data readers and the plain Python iterator -----------------

def _dialogue_problem(record: dict) -> tuple[str, str] | None:
    """Reads the record's conversation (any format of data/conversations.py) into its `turns`."""
    try:
        record["turns"] = conversations.to_turns(record)
    except conversations.NotAConversation as e:
        return e.reason, e.detail
    return None


def _text_problem(record: dict) -> str | None:
    text = record.get("text")
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "text_not_a_string"
    return None if text.strip() else "empty_text"


def is_score(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < NUM_SCORES


def validate(record, kind: str, scored: bool = False) -> tuple[str, str] | None:
    """(reason, detail) why a parsed record cannot be used, or None when it can. A dialogue
    record's turns are read into `turns` on the way. `scored`: it must carry its `score` (records
    of the score folders, data/split.py)."""
    if not isinstance(record, dict):
        return "not_an_object", ""
    if kind == "dialogue":
        problem = _dialogue_problem(record)
    else:
        problem = _text_problem(record)
        problem = problem and (problem, "")
    if problem is None and scored and not is_score(record.get("score")):
        return "bad_score", ""
    return problem


class LoneSurrogate(ValueError):
    """A JSON string escape of half a UTF-16 pair (`"\\ud800"`): valid JSON, but the string it
    gives cannot be encoded as UTF-8, so every later step that writes or tokenizes it fails."""

    def __init__(self, field: str):
        super().__init__(f"lone surrogate escape in {field}")
        self.field = field


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # where one can come from; pairs match too


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate_field(value, where: str) -> str | None:
    """The path (`turns[0].text`) of the first string in a parsed JSON value that UTF-8 cannot hold."""
    if isinstance(value, str):
        return None if encodable(value) else where or "the value"
    if isinstance(value, list):
        items = ((f"{where}[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        if not all(encodable(key) for key in value):
            return f"a key of {where or 'the record'}"
        items = ((f"{where}.{key}" if where else key, item) for key, item in value.items())
    else:
        return None
    return next((found for inner, item in items if (found := _lone_surrogate_field(item, inner))), None)


def loads(line: bytes | str):
    """json.loads for every JSONL reader: also refuses (LoneSurrogate, naming the field) a value
    that UTF-8 cannot hold, so no reader hands such a string on. Only lines with a surrogate
    escape are searched."""
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    value = json.loads(text)
    if _SURROGATE_ESCAPE.search(text):
        field = _lone_surrogate_field(value, "")
        if field:
            raise LoneSurrogate(field)
    return value


def parse_json_line(raw: bytes, path: str, line: int, kind: str = "text",
                    scored: bool = False) -> dict | None:
    """A valid record with an `id` (default FILE:LINE), or None after quarantining the line."""
    try:
        record = loads(raw)
        problem = validate(record, kind, scored)
    except UnicodeDecodeError as e:
        problem = "invalid_utf8", f"byte {e.start}"
    except json.JSONDecodeError as e:
        problem = "bad_json", f"{e.msg} at column {e.colno}"
    except LoneSurrogate as e:
        problem = "lone_surrogate", e.field
    if problem and problem[0] == "bad_json" and path.endswith(".gz") and gzip_lines_if_cut_short(path) == line - 1:
        _quarantine_cut_short(path, line - 1)  # the torn line is where the file ends: it was cut short
        return None
    if problem:
        reason, detail = problem
        QUARANTINE.add(reason, (path, line), file=path, line=line, detail=detail, raw=raw_text(raw))
        return None
    if record.get("id") in (None, ""):
        record["id"] = f"{os.path.basename(path)}:{line}"
    return record


@functools.lru_cache(maxsize=256)
def gzip_lines_if_cut_short(path: str) -> int | None:
    """The whole lines a gzip file holds when its stream ends before gzip's end marker (a copy or
    a write cut short), else None. Decompresses the file once; asked only when a reader meets a
    torn line in a gzip file or cannot read one to its end."""
    lines, member_open = 0, False
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                try:
                    lines += decompressor.decompress(chunk).count(b"\n")
                except zlib.error:  # damaged past this point: as good as cut short
                    return lines
                member_open = not decompressor.eof
                chunk = decompressor.unused_data  # the next member of a multi-member file
                if decompressor.eof:
                    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    return lines if member_open else None


def _quarantine_cut_short(path: str, lines: int) -> None:
    QUARANTINE.add("truncated_file", (path,), file=path, line=lines + 1,
                   detail=f"gzip stream cut short: {lines} whole lines read")


def iter_records(files: Sequence[str], kind: str = "text") -> Iterator[dict]:
    """Valid records in file order (vocabulary training, statistics, the Beam job); a gzip file
    cut short is set aside from where it breaks off (`truncated_file`)."""
    for path in files:
        line_no = 0
        try:
            with open_file(path) as f:
                for line_no, raw in enumerate(f, start=1):
                    if raw.strip():
                        record = parse_json_line(raw.rstrip(b"\r\n"), path, line_no, kind)
                        if record is not None:
                            yield record
        except EOFError:
            _quarantine_cut_short(path, line_no)


def iter_texts(files: Sequence[str]) -> Iterator[str]:
    return (record["text"] for record in iter_records(files))


PARSE_BATCH = 256  # records parsed per call into Python: the per-call cost, not JSON, dominated

# Features a parsed record becomes: name -> (dtype, ragged). Every source gives `id`, `text` and
# `json`; records of the score folders (data/split.py) add their `score`, dialogue records their
# turns (the texts, who speaks, and the record's own role names, if any), so that no later step
# parses JSON again.
BASE_COLUMNS = {"ok": (tf.bool, False), "id": (tf.string, False), "text": (tf.string, False),
                "json": (tf.string, False)}
SCORE_COLUMNS = {"score": (tf.int32, False)}
DIALOGUE_COLUMNS = {"turn_texts": (tf.string, True), "turn_is_assistant": (tf.bool, True),
                    "role_names": (tf.string, True)}
_EMPTY = {"ok": False, "id": b"", "text": b"", "json": b"", "score": -1,
          "turn_texts": [], "turn_is_assistant": [], "role_names": []}


def _record_columns(record: dict, record_json: bytes | None) -> dict:
    out = {"ok": True, "id": str(record["id"]).encode(), "text": record.get("text", "").encode(),
           "json": record_json or json.dumps(record, ensure_ascii=False).encode(),
           "score": record.get("score", -1)}
    if "turns" in record:
        out["turn_texts"] = [turn["text"].encode() for turn in record["turns"]]
        out["turn_is_assistant"] = [turn["role"] == "assistant" for turn in record["turns"]]
        roles = record.get("roles")
        named = isinstance(roles, dict) and roles.get("user") and roles.get("assistant")
        out["role_names"] = [str(roles["user"]).encode(), str(roles["assistant"]).encode()] if named else []
    return out


def _as_example(record: dict | None, record_json: bytes | None = None,
                columns: dict = BASE_COLUMNS) -> tuple:
    values = _EMPTY if record is None else {**_EMPTY, **_record_columns(record, record_json)}
    return tuple(values[name] for name in columns)


def _parsed(parse_one, batch: tf.data.Dataset, columns: dict = BASE_COLUMNS) -> tf.data.Dataset:
    """Maps `parse_one(*scalars) -> row of `columns`` over batches of records in one Python call
    per batch, then unbatches. Ragged columns travel as flat values and row lengths."""
    out_types = []
    for dtype, ragged in columns.values():
        out_types += [dtype, tf.int64] if ragged else [dtype]

    def parse_batch(*inputs):
        rows = [parse_one(*args) for args in zip(*inputs)]
        arrays = []
        for i, (dtype, ragged) in enumerate(columns.values()):
            np_type = object if dtype == tf.string else dtype.as_numpy_dtype
            if ragged:
                arrays.append(np.array([v for row in rows for v in row[i]], dtype=np_type))
                arrays.append(np.array([len(row[i]) for row in rows], dtype=np.int64))
            else:
                arrays.append(np.array([row[i] for row in rows], dtype=np_type))
        return tuple(arrays)

    def to_features(*inputs):
        flat = iter(tf.numpy_function(parse_batch, list(inputs), out_types, stateful=False))
        features = {}
        for name, (_, ragged) in columns.items():
            values = next(flat)
            values.set_shape([None])
            if ragged:
                lengths = next(flat)
                lengths.set_shape([None])
                values = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
            features[name] = values
        return features

    return batch.map(to_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def _valid_only(ds: tf.data.Dataset) -> tf.data.Dataset:
    ds = ds.filter(lambda ex: ex["ok"])
    return ds.map(lambda ex: {k: v for k, v in ex.items() if k != "ok"})


class _HashSplitMixin:
    """`train` and `validation` from the same records, by hashing the document id."""

    @property
    def validation_permille(self) -> int:
        return self._validation_permille

    def _split(self, ds: tf.data.Dataset, split: str) -> tf.data.Dataset:
        permille = self._validation_permille
        in_validation = lambda ex: tf.strings.to_hash_bucket_fast(ex["id"], HASH_BUCKETS) < permille  # noqa: E731
        if split == "validation":
            return ds.filter(in_validation)
        return ds.filter(lambda ex: tf.logical_not(in_validation(ex)))


def _check_split_args(validation_permille: int, kind: str) -> None:
    if not 0 <= validation_permille < HASH_BUCKETS:
        raise errors.UserError(f"validation_permille must be in [0, {HASH_BUCKETS}), got {validation_permille}")
    if kind not in RECORD_KINDS:
        raise errors.UserError(f"record kind must be one of {RECORD_KINDS}, got {kind!r}")


class JsonlDataSource(_HashSplitMixin, seqio.FileDataSource):
    """JSONL or JSONL.gz files: one JSON object a line with `text` (or `turns`), `id` and any
    extra fields, which travel along in the `json` feature.

    `line_filter` (raw line -> bool tensor) may drop lines before they are parsed: a cheap test
    that must only drop lines a later step would drop anyway (see scores.line_prefilter).
    `scored`: records carry their `score` 0-5 (the score folders of data/split.py), given as a
    feature; a record without a valid one is quarantined. Dialogue records give their turns as
    features (see DIALOGUE_COLUMNS).
    """

    def __init__(self, files: Sequence[str], validation_permille: int = 20, kind: str = "text",
                 line_filter: Callable[[tf.Tensor], tf.Tensor] | None = None, scored: bool = False):
        _check_split_args(validation_permille, kind)
        self._files, self._validation_permille, self._kind = list(files), validation_permille, kind
        self._scored = scored
        columns = {**BASE_COLUMNS, **(SCORE_COLUMNS if scored else {}),
                   **(DIALOGUE_COLUMNS if kind == "dialogue" else {})}
        compression = "GZIP" if all(f.endswith(".gz") for f in files) else ""
        if compression == "" and any(f.endswith(".gz") for f in files):
            raise errors.UserError("mix of gzip and plain JSONL files in one source; use one kind")

        def parse(line, raw, path):
            return _as_example(parse_json_line(raw, path.decode(), int(line), kind, scored), raw, columns)

        def read_file(path):
            lines = tf.data.TextLineDataset(path, compression_type=compression).enumerate(start=1)
            if line_filter is not None:  # first: it reads only the line's start
                lines = lines.filter(lambda _, raw: line_filter(raw))
            lines = lines.filter(lambda _, raw: tf.strings.regex_full_match(raw, r"\s*") == False)  # noqa: E712
            lines = lines.map(lambda line, raw: (line, raw, path)).batch(PARSE_BATCH)
            return _parsed(parse, lines, columns)

        super().__init__(read_file_fn=read_file,
                         split_to_filepattern={"train": list(files), "validation": list(files)})

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
        return self._split(_valid_only(ds), split)

    def list_shards(self, split: str) -> list[str]:
        return list(self._split_to_filepattern[split])

    def with_line_filter(self, line_filter) -> JsonlDataSource:
        """The same files and split, with lines pre-filtered."""
        return JsonlDataSource(self._files, self._validation_permille, self._kind, line_filter, self._scored)


def _feature_value(feature: tf.train.Feature):
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return values[0] if len(values) == 1 else values


def parse_tfrecord_example(raw: bytes, path: str, index: int, text_feature: str, id_feature: str):
    """A record from a serialized tf.train.Example, or None after quarantining it."""
    try:
        example = tf.train.Example.FromString(raw)
        record = {k: _feature_value(v) for k, v in example.features.feature.items()}
        record["text"] = record.pop(text_feature, None)
        if id_feature in record:
            record["id"] = str(record.pop(id_feature))
        problem, detail = validate(record, "text") or (None, "")
    except UnicodeDecodeError as e:
        problem, detail = "invalid_utf8", f"byte {e.start}"
    except Exception as e:  # noqa: BLE001 (protobuf raises its own DecodeError)
        problem, detail = "bad_record", type(e).__name__
    if problem:
        QUARANTINE.add(problem, (path, index), file=path, line=index, detail=detail,
                       raw=raw_text(raw))
        return None
    record.setdefault("id", f"{os.path.basename(path)}:{index}")
    return record


class TfrecordDataSource(_HashSplitMixin, seqio.FileDataSource):
    """TFRecord files of tf.train.Example with a bytes `text_feature` (and optional id)."""

    def __init__(self, files: Sequence[str], validation_permille: int = 20,
                 text_feature: str = "text", id_feature: str = "id", compression: str = ""):
        _check_split_args(validation_permille, "text")
        self._validation_permille = validation_permille

        def parse(index, raw, path):
            return _as_example(parse_tfrecord_example(raw, path.decode(), int(index),
                                                      text_feature, id_feature))

        def read_file(path):
            records = tf.data.TFRecordDataset(path, compression_type=compression).enumerate()
            return _parsed(parse, records.map(lambda index, raw: (index, raw, path)).batch(PARSE_BATCH))

        super().__init__(read_file_fn=read_file,
                         split_to_filepattern={"train": list(files), "validation": list(files)})

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
        return self._split(_valid_only(ds), split)

    def list_shards(self, split: str) -> list[str]:
        return list(self._split_to_filepattern[split])


class TfdsTextSource(_HashSplitMixin, seqio.DataSource):
    """A text feature of a built TFDS dataset (`name` or `name:version`, in `data_dir`).

    Documents without their own id feature get TFDS's stable per-example id. Our `train` and
    `validation` are both carved from `tfds_split` by id hash, like the file sources.
    """

    def __init__(self, name: str, data_dir: str | None = None, tfds_split: str = "train",
                 text_feature: str = "text", id_feature: str | None = None,
                 validation_permille: int = 20):
        import tensorflow_datasets as tfds

        _check_split_args(validation_permille, "text")
        self._validation_permille = validation_permille
        try:
            self._builder = tfds.builder(name, data_dir=data_dir)
            self._split_info = self._builder.info.splits[tfds_split]
        except Exception as e:  # noqa: BLE001 (tfds raises several kinds for a missing dataset)
            raise errors.UserError(f"cannot open TFDS dataset {name!r} split {tfds_split!r} in "
                                   f"{data_dir or 'the default data_dir'}: {e}") from e
        self._name, self._tfds_split = name, tfds_split
        self._text_feature, self._id_feature = text_feature, id_feature
        super().__init__(splits=("train", "validation"))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        return list(self._split_info.filenames)

    def num_input_examples(self, split: str) -> int | None:
        return None

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        import tensorflow_datasets as tfds

        context = None
        if shard_info:
            context = tf.distribute.InputContext(num_input_pipelines=shard_info.num_shards,
                                                 input_pipeline_id=shard_info.index)
        read_config = tfds.ReadConfig(add_tfds_id=True, input_context=context, shuffle_seed=seed)
        ds = self._builder.as_dataset(split=self._tfds_split, shuffle_files=shuffle,
                                      read_config=read_config)
        name, text_feature, id_feature = self._name, self._text_feature, self._id_feature

        def parse(text, doc_id):
            try:
                decoded = text.decode("utf-8")
                problem, detail = validate({"text": decoded}, "text") or (None, "")
            except UnicodeDecodeError as e:
                problem, detail = "invalid_utf8", f"byte {e.start}"
            if problem:
                QUARANTINE.add(problem, (name, doc_id.decode()), file=f"tfds:{name}", line=doc_id.decode(),
                               detail=detail, raw=raw_text(text))
                return _as_example(None)
            return _as_example({"id": doc_id.decode(), "text": decoded})

        def columns(ex):
            doc_id = ex[id_feature] if id_feature else ex["tfds_id"]
            if doc_id.dtype != tf.string:
                doc_id = tf.strings.as_string(doc_id)
            return ex[text_feature], doc_id

        return self._split(_valid_only(_parsed(parse, ds.map(columns).batch(PARSE_BATCH))), split)


MANIFEST = "manifest.json"


def claim_output_dir(output_dir: str, manifest: dict, what: str, keys: Sequence[str] | None = None) -> None:
    """Records what a resumable job writes into `output_dir` (its manifest.json); a rerun of the
    same job resumes there, a different job is refused with the first field that differs
    (`what`: "scores", "labels", ...). `keys`: the fields that must match (default: all)."""
    path = os.path.join(output_dir, MANIFEST)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            old = json.load(f)
        for key in keys if keys is not None else sorted(set(old) | set(manifest)):
            if old.get(key) != manifest.get(key):
                raise errors.UserError(f"{output_dir} holds {what} made with {key}={old.get(key)!r}, this run has "
                                       f"{key}={manifest.get(key)!r}; use another output directory (see {path})")
        return
    tf.io.gfile.makedirs(output_dir)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


@contextlib.contextmanager
def atomic_shards(finals: Sequence[str], temp_dir: str) -> Iterator[list]:
    """Text files (gzip by name) for the paths `finals`, written under `temp_dir` and renamed into
    place together when the block ends without an error: readers and resumed jobs see each shard
    whole or not at all (and a shard that exists is finished)."""
    temps = [os.path.join(temp_dir, f"{os.path.basename(os.path.dirname(f))}-{os.path.basename(f)}") for f in finals]
    tf.io.gfile.makedirs(temp_dir)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_file(t, "wt")) for t in temps]
    for temp, final in zip(temps, finals):
        tf.io.gfile.makedirs(os.path.dirname(final))
        tf.io.gfile.rename(temp, final, overwrite=True)
