"""Peer benchmark: LitGPT (PyTorch) training throughput for our model sizes.

The safety-pretraining paper trained with LitGPT. To judge our JAX/Flax
trainer's speed against that stack, this script builds LitGPT's own ``GPT``
model with the same dimensions as our ``small`` (or ``tiny``) config and
times full training steps on random tokens: forward, cross-entropy, backward,
global-norm clip 1.0 and an AdamW step. It prints one JSON line.

It is not part of safejax and does not import it. It needs its own
virtualenv, kept outside the repo:

    python3.11 -m venv /work/litgpt-venv
    /work/litgpt-venv/bin/pip install torch==2.13.0   # CPU build
    /work/litgpt-venv/bin/pip install litgpt           # keeps that torch

    /work/litgpt-venv/bin/python benchmarks/peers/litgpt_train.py --config small \
        --warmup 3 --steps 10 [--compile]

The step mirrors ``litgpt/pretrain.py`` (tied embeddings as its
``tie_embeddings`` option does, ``chunked_cross_entropy``, gradient clipping,
AdamW) but drives the model with plain PyTorch instead of Lightning Fabric,
which on a single CPU device adds nothing to the arithmetic.
"""

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version

import torch
from litgpt import GPT, Config
from litgpt.utils import chunked_cross_entropy

# Llama-family shapes; must match safejax's configs of the same name.
PRESETS = {
    "small": dict(layers=6, d_model=512, heads=8, kv_heads=8, mlp=1536, vocab=8192, seq_len=512, batch=8),
    "tiny": dict(layers=2, d_model=128, heads=4, kv_heads=2, mlp=384, vocab=8192, seq_len=128, batch=8),
}


def litgpt_config(p: dict) -> Config:
    return Config(
        name=f"safejax-peer-{p['layers']}x{p['d_model']}",
        block_size=p["seq_len"],
        n_layer=p["layers"],
        n_embd=p["d_model"],
        n_head=p["heads"],
        n_query_groups=p["kv_heads"],
        vocab_size=p["vocab"],
        padded_vocab_size=p["vocab"],
        intermediate_size=p["mlp"],
        mlp_class_name="LLaMAMLP",  # SwiGLU
        norm_class_name="RMSNorm",
        norm_eps=1e-5,
        bias=False,
        parallel_residual=False,
        rotary_percentage=1.0,
        rope_base=10000,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as litgpt pretrain does)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    p = PRESETS[args.config]
    threads = args.threads
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    model = GPT(litgpt_config(p))
    model.transformer.wte.weight = model.lm_head.weight  # tied embeddings
    params = sum(t.numel() for t in model.parameters())  # counts the tied matrix once
    model.train()
    step_model = torch.compile(model) if args.compile else model

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)

    def step() -> float:
        tokens = torch.randint(0, p["vocab"], (p["batch"], p["seq_len"] + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = step_model(x)
        loss = chunked_cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        return loss.item()

    load_before = os.getloadavg()[0]  # other work on the machine skews the figure
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    step_time = sum(times) / len(times)
    print(json.dumps({
        "peer": "litgpt",
        "litgpt_version": version("litgpt"),
        "torch_version": torch.__version__,
        "config": args.config,
        "compile": args.compile,
        "tokens_per_sec": round(p["batch"] * p["seq_len"] / step_time, 1),
        "step_time_s": round(step_time, 4),
        "step_time_median_s": round(statistics.median(times), 4),
        "step_time_min_s": round(min(times), 4),
        "steps": args.steps,
        "warmup": args.warmup,
        "final_loss": round(loss, 4),
        "params": params,
        "tied_embeddings": True,
        **p,
        "threads": threads,
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
