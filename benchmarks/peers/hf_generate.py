"""Peer benchmark: Hugging Face transformers `generate` (PyTorch) decoding speed for our model sizes.

Builds a `LlamaForCausalLM` with random weights and the dimensions of our `small` (or `tiny`)
config and times `generate` on random prompts: greedy at batch 1 and 8, beam search with 4 beams,
KV cache on, every run forced to exactly --new_tokens new tokens. Prints one JSON line with new
tokens/s, to set beside `safejax bench sample` (same prompt length, token count and repeats).

It is not part of safejax and does not import it; it runs in its own virtualenv:

    /work/peer-venv/bin/pip install torch==2.13.0 transformers     # the CPU build
    /work/peer-venv/bin/python benchmarks/peers/hf_generate.py --config small --threads 1
"""

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Must match safejax's configs/lm/*.gin of the same name.
PRESETS = {
    "small": dict(layers=6, d_model=512, heads=8, kv_heads=8, mlp=1536, vocab=8192),
    "tiny": dict(layers=2, d_model=128, heads=4, kv_heads=2, mlp=384, vocab=8192),
}


def build(p: dict, context: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["d_model"], intermediate_size=p["mlp"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=context, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                      bos_token_id=3, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS[args.config]
    model = build(p, args.prompt_len + args.new_tokens)
    prompts = torch.randint(8, p["vocab"] - 1, (8, args.prompt_len), generator=torch.Generator().manual_seed(0))
    fixed = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True, pad_token_id=0)
    load_before = os.getloadavg()[0]

    def generate(batch, **kw):
        ids = prompts[:batch]
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **fixed, **kw)

    runs = {
        "greedy_b1": (1, lambda: generate(1, do_sample=False, num_beams=1)),
        "greedy_b8": (8, lambda: generate(8, do_sample=False, num_beams=1)),
        "beam_k4": (1, lambda: generate(1, do_sample=False, num_beams=4, length_penalty=0.0)),
    }
    result = {}
    for name, (rows, fn) in runs.items():
        seconds = timed(fn, args.repeats)
        result[name] = round(rows * args.new_tokens / seconds, 1)
        result[f"{name}_s"] = round(seconds, 4)
    result.update(config=args.config, **p, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  repeats=args.repeats, threads=args.threads, torch=version("torch"),
                  transformers=version("transformers"), load_avg_1m_before=round(load_before, 2),
                  load_avg_1m_after=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
