"""`safejax classifier-train`: the safety classifier trained by the same Trainer as the LM.

The recipe of PAPER.md §1, every number in gin (configs/classifier/):
  1. head-only warm-up (`head_epochs`, lr `head_lr`): the encoder is frozen, and no gradient is
     computed through it (the Trainer's partial steps);
  2. full finetuning (`finetune_epochs`, lr `lr`, weight decay via `adamw`);
  3. the loss of an example scored above 0 is multiplied by λ (`positive_weight`), and every
     example by its class weight (`class_weights`: 'balanced' = inverse frequency in the training
     split, or six numbers).
One batch size serves both phases (the Trainer has one global batch); the paper used 32 then 8.

The data stream is a seeded permutation of the training split per epoch, so the step is the data
position and a resumed run sees the batches the uninterrupted one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from safejax import config, errors, parallel
from safejax.models import encoder as enc
from safejax.models.classifier import ClassifierConfig, SafetyClassifier, is_head
from safejax.safety.classifier_export import export
from safejax.safety import calibration, cascade, documents, labeled
from safejax.train import optim
from safejax.train.checkpoint import Checkpointer
from safejax.train.trainer import TrainConfig, Trainer, fit


@dataclasses.dataclass(frozen=True)
class ClassifierObjective:
    """Weighted multiclass cross-entropy of the 6-way head; the trainer's objective protocol."""

    model_config: ClassifierConfig
    class_weights: tuple[float, ...]
    positive_weight: float  # λ: loss multiplier of examples scored above 0
    partial_steps: int = 0  # head-only warm-up steps

    name = "classifier"

    def create_model(self, rngs: nnx.Rngs) -> SafetyClassifier:
        return SafetyClassifier(self.model_config, rngs=rngs)

    def partial_trainable(self, path: tuple) -> bool:
        return is_head(path)

    def example_weights(self, labels: jax.Array, valid: jax.Array) -> jax.Array:
        weights = jnp.asarray(self.class_weights, jnp.float32)[labels]
        weights = weights * jnp.where(labels > 0, self.positive_weight, 1.0)
        return weights * valid.astype(jnp.float32)

    def loss(self, model: SafetyClassifier, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits = model(batch["tokens"], batch["mask"])
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=-1)[:, 0]
        weights = self.example_weights(batch["labels"], batch["valid"])
        return (nll * weights).sum(), weights.sum()

    def batch_features(self) -> dict:
        length = (self.model_config.seq_len,)
        return {"tokens": (length, jnp.int32), "mask": (length, jnp.int32),
                "labels": ((), jnp.int32), "valid": ((), jnp.int32)}

    def flops_per_example(self) -> float:
        e, t = self.model_config.encoder, self.model_config.seq_len
        per_layer = 4 * e.d_model**2 + 2 * e.d_model * e.mlp_dim
        matmul = e.num_layers * per_layer + e.d_model * self.model_config.num_classes
        return 6.0 * matmul * t + 12.0 * e.num_layers * e.d_model * t * t

    def tokens_per_example(self) -> int:
        return self.model_config.seq_len

    def fingerprint(self) -> dict:
        return {"objective": self.name, **self.model_config.shape_dict(), "seq_len": self.model_config.seq_len,
                "partial_steps": self.partial_steps}

    def checkpoint_fields(self) -> dict:
        """What the checkpoint record says beyond shapes (the tokenizer ships with the export)."""
        return {"model_config": dataclasses.asdict(self.model_config), "seq_len": self.model_config.seq_len, "vocabulary": None}

    def describe(self) -> dict:
        return {**self.fingerprint(), "class_weights": list(self.class_weights),
                "positive_weight": self.positive_weight}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    batch_size: int = 32
    head_epochs: float = 1.0
    finetune_epochs: float = 1.0
    head_lr: float = 1e-3
    lr: float = 1e-5
    lr_warmup_steps: int = 10  # of the finetuning phase (the encoder's Adam moments start at 0)
    positive_weight: float = 1.0
    class_weights: str | Sequence[float] = "balanced"
    eval_examples: int = 512  # of the validation split, for the eval loss at the end of training
    # None: document thresholds at 0.5; a rate: the strictest that hold every benign validation
    # set to it at each level (safety/calibration.calibrate_export)
    document_false_positive_rate: float | None = None
    evaluate: bool = True  # run classifier-eval (model and baselines on the test split) at the end

    def steps(self, examples: int) -> tuple[int, int]:
        """(head-only steps, total steps) for a training split of `examples`."""
        per_epoch = examples // self.batch_size
        head = math.ceil(self.head_epochs * per_epoch)
        return head, head + math.ceil(self.finetune_epochs * per_epoch)


def class_weights(setting, labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """'balanced': n / (k * n_c) over the k classes present (absent classes get 1); or the list."""
    if isinstance(setting, str):
        if setting != "balanced":
            raise errors.UserError(f"class_weights must be 'balanced' or {num_classes} numbers, got {setting!r}")
        counts = np.bincount(labels, minlength=num_classes)
        present = counts > 0
        weights = np.where(present, len(labels) / (present.sum() * np.maximum(counts, 1)), 1.0)
        return tuple(float(w) for w in weights)
    if len(setting) != num_classes:
        raise errors.UserError(f"class_weights needs {num_classes} numbers, got {len(setting)}")
    return tuple(float(w) for w in setting)


def schedule(cfg: ClassifierTrainConfig, head_steps: int) -> optax.Schedule:
    """head_lr for the head-only steps, then a short warm-up to lr, then constant (the paper's)."""
    finetune = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(cfg.lr_warmup_steps, 1)), optax.constant_schedule(cfg.lr)],
        [max(cfg.lr_warmup_steps, 1)])
    return optax.join_schedules([optax.constant_schedule(cfg.head_lr), finetune], [head_steps])


# ---- data ----

@dataclasses.dataclass
class Encoded:
    """One split, tokenized once: each example's token ids (special tokens included, at most
    seq_len) and its label."""
    examples: list[labeled.Example]
    rows: list[list[int]]
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.rows), np.int64, len(self.rows))


def encode(examples: list[labeled.Example], tokenizer) -> Encoded:
    rows = [e.ids for e in tokenizer.encode_batch([e.text for e in examples])]
    return Encoded(examples, rows, np.array([e.score for e in examples], np.int32))


def length_buckets(seq_len: int) -> list[int]:
    """Padded batch lengths: powers of two from 64, and seq_len (one compilation each)."""
    sizes = [64]
    while sizes[-1] * 2 < seq_len:
        sizes.append(sizes[-1] * 2)
    return [b for b in sizes if b < seq_len] + [seq_len]


def _rows(data: Encoded, idx: np.ndarray, valid: np.ndarray, width: int) -> dict[str, np.ndarray]:
    tokens = np.zeros((len(idx), width), np.int32)
    for row, k in enumerate(idx):
        tokens[row, :len(data.rows[k])] = data.rows[k]
    return {"tokens": tokens, "mask": (tokens != 0).astype(np.int32), "labels": data.labels[idx],
            "valid": valid.astype(np.int32)}


def _width(data: Encoded, idx: np.ndarray, buckets: list[int]) -> int:
    longest = max(len(data.rows[k]) for k in idx)
    return next(b for b in buckets if b >= longest)


POOL_BATCHES = 50  # batches drawn from one sorted pool: similar lengths, still well shuffled


def epoch_batches(data: Encoded, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch, as example indices: a seeded permutation cut into pools
    of POOL_BATCHES batches, each pool sorted by length (so a batch pads little), and the batches
    shuffled again. The permutation's last n % batch_size examples wait for another epoch."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(data.labels))
    lengths = data.lengths
    batches = []
    pool = batch_size * POOL_BATCHES
    for start in range(0, len(perm) - len(perm) % batch_size, pool):
        chunk = perm[start:start + pool]
        chunk = chunk[:len(chunk) - len(chunk) % batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_batches(data: Encoded, batch_size: int, seed: int, position: int, seq_len: int) -> Iterator[dict]:
    """This process's rows of every global batch from `position` on, padded to the batch's
    length bucket. The batches are a function of (seed, step), so a resumed run sees the ones
    the uninterrupted run would have."""
    per_host = batch_size // jax.process_count()
    host_offset = jax.process_index() * per_host
    buckets = length_buckets(seq_len)
    per_epoch = len(data.labels) // batch_size
    if per_epoch == 0:
        raise errors.UserError(f"the training split ({len(data.labels)}) is smaller than one batch ({batch_size})")
    step = position
    epoch, batches = None, []
    while True:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(data, batch_size, seed, epoch)
        idx = batches[step % per_epoch]
        mine = idx[host_offset:host_offset + per_host]
        yield _rows(data, mine, np.ones(per_host, bool), _width(data, idx, buckets))
        step += 1


def eval_batches(data: Encoded, batch_size: int, seq_len: int) -> list[dict]:
    """The whole split once, sorted by length, the last batch padded with rows of weight 0."""
    per_host = batch_size // jax.process_count()
    host_offset = jax.process_index() * per_host
    buckets = length_buckets(seq_len)
    n = len(data.labels)
    order = np.argsort(data.lengths, kind="stable")
    batches = []
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        pos = np.arange(start + host_offset, start + host_offset + per_host)
        mine = order[np.minimum(pos, n - 1)]
        batches.append(_rows(data, mine, pos < n, _width(data, idx, buckets)))
    return batches


# ---- the command ----

def examples(data_cfg: labeled.LabeledDataConfig, doc_cfg: documents.DocumentDataConfig, tokenizer,
             seq_len: int) -> tuple[dict[str, list[labeled.Example]], labeled.LoadResult]:
    """Each split's labeled snippets and request-set prompts plus its long examples
    (safety/documents.py), built from that split's snippets and documents only."""
    splits, loaded = labeled.load(data_cfg)
    cutter = documents.WindowCutter(tokenizer, seq_len - 2)
    for name in ("train", "validation"):
        splits[name] = splits[name] + documents.request_examples(doc_cfg, name)
        windows = documents.clean_windows(doc_cfg, name, cutter)
        splits[name] = splits[name] + documents.long_examples(
            doc_cfg, splits[name], windows, name, cutter.count, cutter.window)
    return splits, loaded


@dataclasses.dataclass
class Built:
    trainer: Trainer
    train: Encoded
    validation: Encoded  # a sample of the validation split, for the eval loss
    calibration: list[labeled.Example]  # the whole validation split, for calibrate_export
    lr: optax.Schedule
    loaded: labeled.LoadResult


def build(data_cfg: labeled.LabeledDataConfig, doc_cfg: documents.DocumentDataConfig,
          train_cfg: ClassifierTrainConfig, model: ClassifierConfig) -> Built:
    """Loads and tokenizes the data, builds the objective, optimizer and trainer."""
    tokenizer = enc.load_tokenizer(model.encoder, model.seq_len)
    splits, loaded = examples(data_cfg, doc_cfg, tokenizer, model.seq_len)
    if not splits["train"]:
        raise errors.UserError("the classifier's training split is empty (LabeledDataConfig)")
    train = encode(splits["train"], tokenizer)
    validation = splits["validation"]
    if len(validation) > train_cfg.eval_examples:  # a seeded sample, every source represented
        keep = np.random.default_rng(data_cfg.seed).choice(len(validation), train_cfg.eval_examples, replace=False)
        validation = [validation[i] for i in sorted(keep)]
    validation = encode(validation, tokenizer)
    head_steps, total_steps = train_cfg.steps(len(train.labels))
    objective = ClassifierObjective(
        model, class_weights(train_cfg.class_weights, train.labels, model.num_classes),
        float(train_cfg.positive_weight), partial_steps=head_steps)
    lr = schedule(train_cfg, head_steps)
    trainer = Trainer(objective, optim.adamw(lr), TrainConfig(steps=total_steps),
                      parallel.build_mesh(), parallel.logical_rules(), train_cfg.batch_size)
    return Built(trainer, train, validation, splits["validation"], lr, loaded)


def train(workdir: str) -> dict:
    """Trains (or resumes) in WORKDIR, exports WORKDIR/model, evaluates into WORKDIR/eval.json."""
    from safejax.safety import classifier_eval

    data_cfg, train_cfg, model = labeled.LabeledDataConfig(), ClassifierTrainConfig(), ClassifierConfig()
    doc_cfg = documents.DocumentDataConfig()
    built = build(data_cfg, doc_cfg, train_cfg, model)
    trainer, train_data, validation, lr, loaded = built.trainer, built.train, built.validation, built.lr, built.loaded
    if jax.process_index() == 0:
        config.write_effective_config(workdir)
        with open(os.path.join(workdir, "data.json"), "w", encoding="utf-8") as f:
            json.dump({**loaded.counts(), "splits_used": {"train": len(train_data.labels),
                                                          "validation": len(validation.labels)},
                       "train_scores": dict(collections.Counter(map(int, train_data.labels))),
                       "train_kinds": dict(collections.Counter(e.source for e in train_data.examples))},
                      f, indent=1)
    logging.info("classifier %s on mesh %s", json.dumps(trainer.objective.describe()), dict(trainer.mesh.shape))
    summary = fit(trainer, workdir,
                  lambda position: train_batches(train_data, train_cfg.batch_size, trainer.cfg.seed, position,
                                                 model.seq_len),
                  lambda: eval_batches(validation, train_cfg.batch_size, model.seq_len), lr)
    summary["head_steps"] = trainer.partial_steps
    if summary["status"] != "completed":
        return summary
    model_dir = os.path.join(workdir, "model")
    checkpointer = Checkpointer(workdir, asynchronous=False)
    try:
        state = trainer.load_state(checkpointer, checkpointer.latest_step())
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        export(jax.device_get(state["params"]), model, model_dir)
        corpus = documents.load_corpus(doc_cfg)
        clean = {name: [d.text for d in corpus[name]["validation"]] for name in doc_cfg.clean_sources}
        benign = documents.benign_requests(doc_cfg, "validation")
        val_texts, val_labels = [e.text for e in built.calibration], np.array([e.score for e in built.calibration])
        summary["calibration"], val_probs = calibration.calibrate_export(
            model_dir, val_texts, val_labels, clean, data_cfg.seed, train_cfg.batch_size,
            train_cfg.document_false_positive_rate, benign)
        fitted = cascade.fit_export(
            model_dir, cascade.CascadeConfig(), [e.text for e in train_data.examples], train_data.labels,
            val_texts, val_labels, [t for texts in clean.values() for t in texts], data_cfg.seed,
            train_cfg.batch_size, val_probs)
        summary["cascade"] = fitted and {k: v for k, v in fitted.items() if k not in ("head", "cleared_probs")}
        if train_cfg.evaluate:
            summary["eval"] = classifier_eval.evaluate(workdir)["model"]
    summary.update(workdir=os.path.abspath(workdir), model=os.path.abspath(model_dir))
    return summary
