"""The exported safety classifier (DIR/model, written by `safejax classifier-train`): writing it,
its record (classifier.json: config, calibration, document rule), and `Scorer`, a jit-compiled
function from batches of texts or token ids to probabilities over the 6 scores, which `safejax
score`, the calibration and the evaluation use.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from safejax import errors, parallel
from safejax.models import encoder as enc
from safejax.models.classifier import ClassifierConfig, SafetyClassifier

EXPORT_CONFIG = "classifier.json"


def export(params: dict, cfg: ClassifierConfig, directory: str) -> str:
    """Writes a self-contained classifier: params (orbax), its config and the tokenizer."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), params)
    shutil.copy(os.path.join(enc.weights_dir(cfg.encoder), "tokenizer.json"), directory)
    record = {"encoder": dataclasses.asdict(cfg.encoder), "seq_len": cfg.seq_len,
              "num_classes": cfg.num_classes}
    record["encoder"]["weights_dir"] = directory  # the tokenizer now lives beside the params
    with open(os.path.join(directory, EXPORT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return directory


def read_export_record(directory: str) -> dict:
    """classifier.json of an export: its config, and the calibration and document rule that
    `safejax classifier-train` adds after training (absent: uncalibrated, max over windows)."""
    path = os.path.join(directory, EXPORT_CONFIG)
    if not os.path.isfile(path):
        raise errors.UserError(f"{directory} is not an exported classifier (no {EXPORT_CONFIG}); "
                               f"pass the model/ folder that safejax classifier-train writes")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}: not a classifier config ({' '.join(str(e).split())})") from e


def update_export_record(directory: str, **fields) -> None:
    """Adds fields (calibration, document rule) to an export's classifier.json."""
    record = read_export_record(directory)
    record.update(fields)
    path = os.path.join(directory, EXPORT_CONFIG)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def read_export_config(directory: str) -> ClassifierConfig:
    record = read_export_record(directory)
    try:
        encoder = enc.EncoderConfig(**{**record["encoder"], "weights_dir": os.path.abspath(directory)})
        return ClassifierConfig(encoder=encoder, seq_len=record["seq_len"],
                                num_classes=record["num_classes"], pretrained=False)
    except (KeyError, TypeError) as e:
        path = os.path.join(directory, EXPORT_CONFIG)
        raise errors.UserError(f"{path}: not a classifier config ({' '.join(str(e).split())})") from e


class Scorer:
    """Probabilities over the 6 scores for batches of texts, from an exported classifier.

    Batches are padded to `batch_size` rows (one compilation per bucket) and sharded over every
    device of the mesh's batch axes, and so are the results (no collective: in-flight batches
    with a cross-device gather can deadlock XLA:CPU's simulated devices); parameters are
    replicated (the encoder is small).
    """

    IN_FLIGHT = 4

    def __init__(self, directory: str, *, batch_size: int = 32, mesh=None, dtype: str | None = None,
                 calibrated: bool = True, cascade: bool = True):
        """`dtype` overrides the export's compute dtype (e.g. "bfloat16"); parameters stay float32.
        Probabilities are calibrated by the export's temperature and bias (safety/calibration.py)
        unless `calibrated` is False (the raw head, for fitting them). With `cascade` and an
        export that carries one (safety/cascade.py), `cascade_probs_ids` lets its first stage
        clear windows (DocumentScorer decides which may go through it)."""
        import orbax.checkpoint as ocp

        self.cfg = read_export_config(directory)
        self.record = read_export_record(directory)
        calibration = self.record.get("calibration") if calibrated else None
        self.temperature = float(calibration["temperature"]) if calibration else 1.0
        self.bias = np.asarray(calibration["bias"] if calibration else np.zeros(self.cfg.num_classes), np.float32)
        if dtype not in (None, "float32", "bfloat16"):
            raise errors.UserError(f"scoring dtype must be float32 or bfloat16, got {dtype!r}")
        if dtype is not None:
            self.cfg = dataclasses.replace(self.cfg, encoder=dataclasses.replace(self.cfg.encoder, dtype=dtype))
        self.tokenizer = enc.load_tokenizer(self.cfg.encoder, self.cfg.seq_len)
        self.mesh = mesh or parallel.build_mesh(shape=(-1, 1, 1))
        self.batch_size = batch_size
        if batch_size % self.mesh.size:
            raise errors.UserError(f"scoring batch {batch_size} is not divisible by the {self.mesh.size} devices")
        abstract = nnx.eval_shape(lambda: SafetyClassifier(self.cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract)
        replicated = parallel.replicated(self.mesh)
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                              abstract_state.to_pure_dict())
        try:
            with ocp.StandardCheckpointer() as ckpt:
                self.params = ckpt.restore(os.path.join(os.path.abspath(directory), "params"), shapes)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise errors.UserError(f"cannot restore classifier params from {directory}: "
                                   f"{' '.join(str(e).split())[:300]}") from e
        self._batch = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
        self._probs = jax.jit(self._forward, in_shardings=(replicated, self._batch, self._batch),
                              out_shardings=self._batch)
        self._first = jax.jit(self._first_stage, static_argnums=3,
                              in_shardings=(replicated, self._batch, self._batch),
                              out_shardings=(self._batch, self._batch))
        self._rest = jax.jit(self._second_stage, static_argnums=3,
                             in_shardings=(replicated, self._batch, self._batch), out_shardings=self._batch)
        self.cascade = self.record.get("cascade") if cascade and calibrated else None
        self.windows_cleared = 0  # by the cascade, since construction (benchmarks read it)

    def _forward(self, params, tokens, mask):
        model = nnx.merge(self.graphdef, params)
        return jax.nn.softmax(model(tokens, mask) / self.temperature + self.bias, axis=-1)

    def _first_stage(self, params, tokens, mask, num_layers):
        """The encoder's first layers: pooled features (for the exit head and its fit), and the
        hidden states the cascade's second stage resumes from."""
        hidden = nnx.merge(self.graphdef, params).encoder(tokens, mask, num_layers)
        return enc.mean_pool(hidden, mask), hidden

    def _second_stage(self, params, hidden, mask, start):
        model = nnx.merge(self.graphdef, params)
        return jax.nn.softmax(model.resume(hidden, mask, start) / self.temperature + self.bias, axis=-1)

    def buckets(self) -> list[int]:
        """Padded lengths: powers of two from 16, and seq_len (one compilation each)."""
        sizes = [16]
        while sizes[-1] * 2 < self.cfg.seq_len:
            sizes.append(sizes[-1] * 2)
        return [b for b in sizes if b < self.cfg.seq_len] + [self.cfg.seq_len]

    def compile(self) -> None:
        """Compiles every bucket now (a benchmark times scoring, not compilation)."""
        for width in self.buckets():
            rows = np.ones((self.batch_size, width), np.int32)
            jax.block_until_ready(self._probs(self.params, rows, rows))
            if self.cascade:
                layer = self.cascade["exit_layer"]
                _, hidden = jax.block_until_ready(self._first(self.params, rows, rows, layer))
                jax.block_until_ready(self._rest(self.params, hidden, rows, layer))

    def probs(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_classes) float32 probabilities through the whole encoder; texts longer
        than seq_len are truncated."""
        return self.probs_ids([e.ids for e in self.tokenizer.encode_batch(list(texts))])

    def probs_ids(self, rows: list[list[int]]) -> np.ndarray:
        """(len(rows), num_classes) float32 probabilities of token id rows (special tokens
        included, at most seq_len each), every row through the whole encoder."""
        return self._batched(lambda tokens, mask: self._probs(self.params, tokens, mask), rows, self.cfg.num_classes)

    def cascade_probs_ids(self, rows: list[list[int]], eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities through the cascade, and which rows its first stage cleared. `eligible`
        (a mask, default all): the rows that go through the first stage; the others go straight
        to the whole encoder.

        A row the exit keeps resumes from the first stage's hidden states, so it costs one pass
        of the encoder, not one and the first stage again. Kept rows are gathered into full
        batches for the second stage (padded to the longest among them: padding never reaches
        a real token), dispatched while the first stage goes on.
        """
        from safejax.safety import cascade

        layer, head, threshold = self.cascade["exit_layer"], self.cascade["head"], self.cascade["threshold"]
        eligible = np.ones(len(rows), bool) if eligible is None else np.asarray(eligible, bool)
        out = np.zeros((len(rows), self.cfg.num_classes), np.float32)
        cleared = np.zeros(len(rows), bool)
        direct = np.flatnonzero(~eligible)
        if len(direct):
            out[direct] = self.probs_ids([rows[i] for i in direct])
        first = np.flatnonzero(eligible)
        kept, second = [], collections.deque()  # (row, hidden states) waiting; dispatched batches

        def dispatch(take):
            batch, kept[:] = kept[:take], kept[take:]
            width = next(b for b in self.buckets() if b >= max(len(h) for _, h in batch))
            hidden = np.zeros((self.batch_size, width, self.cfg.encoder.d_model), np.float32)
            mask = np.zeros((self.batch_size, width), np.int32)
            mask[len(batch):, 0] = 1  # filler rows: one position, never all padding
            for i, (_, h) in enumerate(batch):
                hidden[i, :len(h)], mask[i, :len(h)] = h, 1
            second.append((np.array([r for r, _ in batch]), self._rest(self.params, hidden, mask, layer)))

        stage = lambda tokens, mask: self._first(self.params, tokens, mask, layer)
        for idx, (pooled, hidden) in self._pipelined(stage, [rows[i] for i in first]):
            rows_here = first[idx]
            clear = cascade.exit_scores(np.asarray(pooled)[:len(idx)], head) < threshold
            cleared[rows_here[clear]] = True
            hidden = np.asarray(hidden)
            kept += [(rows_here[i], hidden[i, :len(rows[rows_here[i]])]) for i in np.flatnonzero(~clear)]
            while len(kept) >= self.batch_size:
                dispatch(self.batch_size)
        if kept:
            dispatch(len(kept))
        for idx, result in second:
            out[idx] = np.asarray(result)[:len(idx)]
        out[cleared] = np.asarray(self.cascade["cleared_probs"], np.float32)
        self.windows_cleared += int(cleared.sum())
        return out, cleared

    def pooled_ids(self, rows: list[list[int]], num_layers: int) -> np.ndarray:
        """(len(rows), d_model) mean-pooled outputs of the encoder's first `num_layers` layers."""
        return self._batched(lambda tokens, mask: self._first(self.params, tokens, mask, num_layers)[0], rows,
                             self.cfg.encoder.d_model)

    def _batched(self, fn, rows: list[list[int]], width_out: int) -> np.ndarray:
        """`fn(tokens, mask)` over padded batches of the rows, results in the rows' order."""
        out = np.zeros((len(rows), width_out), np.float32)
        for idx, result in self._pipelined(fn, rows):
            out[idx] = np.asarray(result)[:len(idx)]
        return out

    def _pipelined(self, fn, rows: list[list[int]]):
        """Yields (row indices, `fn(tokens, mask)`) for padded batches of the rows.

        Rows are sorted by length and each batch padded only to the smallest bucket that holds
        it, so short rows cost a fraction of a full-length forward pass. Up to IN_FLIGHT batches
        are dispatched before the oldest result is yielded, so the host prepares the next batches
        while the devices compute.
        """
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        if len(rows) and lengths.max() > self.cfg.seq_len:
            raise ValueError(f"a row of {lengths.max()} tokens is longer than seq_len={self.cfg.seq_len}")
        order = np.argsort(lengths, kind="stable")
        buckets = self.buckets()
        pending = collections.deque()
        for start in range(0, len(rows), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = next(b for b in buckets if b >= lengths[idx[-1]])
            tokens = np.zeros((self.batch_size, width), np.int32)
            for row, k in enumerate(idx):
                tokens[row, :lengths[k]] = rows[k]
            tokens[len(idx):, 0] = tokens[0, 0]  # filler rows: one real token, never all padding
            pending.append((idx, fn(tokens, (tokens != 0).astype(np.int32))))
            if len(pending) > self.IN_FLIGHT:
                yield pending.popleft()
        yield from pending
