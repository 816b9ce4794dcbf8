"""Stage-1 candidate sampling (GPU): one edit's 25 x 48 open-book candidates, the prompt stored once as a
shared prefix against the prompt copied into every row, on the same weights, seed and prompt.

Default model: the embedded SmolLM2-135M-Instruct (real weights: rows stop at EOS), prompt = the open-book
prompt of MQuAKE-hard case 8772's first rewrite, the `smollm2-135m-instruct` preset's sampling values.
`--random-7b`: a random-init Qwen2.5-7B and a random 640-token prompt (no EOS: every row runs to the limit).
Modes: `per-row, 1024 rows` (the engine before the shared prefix: batches of at most 1,024 rows),
`per-row` (one batch), `shared` (the default engine). Each is timed on its second identical call.
Floor = sum over decode steps of max(bytes / bandwidth, flops / matmul rate), bytes = the weights once plus
the KV slots each mode must read at that step (all rows' own slots; the shared prompt once).

GPU:  cd bench && PYTHONPATH=.. python bootstrap_sampling.py [--random-7b] [--out bootstrap_sampling.json]
CPU:  cd bench && PYTHONPATH=.. python bootstrap_sampling.py --device cpu --samples 32 --max-new 48  (fp32, no floor)
"""
from __future__ import annotations

import argparse
import importlib
import random
import time

import torch

from common import (QWEN25_7B, device_line, matmul_params, measure_bandwidth, measure_matmul_flops, random_model, timed,
                    write_json)
from code_edit.tokens import chat_ids
from code_edit.config import load_hparams
from code_edit.data import edit_requests, load_dataset
from code_edit.prompts import bootstrap_messages
from model import load_model, load_tokenizer

G = importlib.import_module("model.generate")  # the module (the package re-exports the function by that name)

MODES = {"per-row, 1024 rows": (0, 1024), "per-row": (0, G.MAX_ROWS), "shared": (G.SHARED_PREFIX_MAX_PROMPTS, G.MAX_ROWS)}


def floor_seconds(model, P: int, lengths: list[int], shared: bool, bw: float, flops: float) -> float:
    cfg = model.config
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nparams = matmul_params(model)
    kv_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.lm_head.weight.element_size()
    total = 0.0
    for t in range(max(lengths)):
        n = sum(1 for L in lengths if L > t)
        slots = P + n * t if shared else n * (P + t)
        total += max((wbytes + slots * kv_slot) / bw, 2 * nparams * n / flops)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--random-7b", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: fp32 SmolLM2, one call per mode, no floor")
    ap.add_argument("--samples", type=int, help="default: the preset's replicas x candidates")
    ap.add_argument("--max-new", type=int, help="default: the preset's limit")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        bw, flops = measure_bandwidth(), measure_matmul_flops()
        print(f"device: {device_line()}; copy {bw / 1e12:.2f} TB/s; bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    if args.random_7b:
        cfg = load_hparams("qwen2.5-7b-instruct")
        model = random_model(QWEN25_7B)
        rng = random.Random(0)
        prompt, stops = [rng.randrange(1000, 150000) for _ in range(640)], []
    else:
        cfg = load_hparams("smollm2-135m-instruct")
        model = load_model(cfg.model.source, dtype=torch.bfloat16 if cuda else torch.float32, device=args.device).eval()
        tok = load_tokenizer(cfg.model.source)
        (case,) = [c for c in load_dataset("MQuAKE-hard") if c["case_id"] == 8772]
        req = edit_requests(case)[0]
        prompt = chat_ids(tok, bootstrap_messages(req.question, old_answer=req.old_answer, new_answer=req.new_answer,
                                                  article=req.article))
        stops = list(tok.eos_ids)
    b = cfg.bootstrap
    n = args.samples or b.replica_times * b.num_samples
    budget = min(args.max_new or b.max_new_tokens, cfg.model.max_seq_len - len(prompt))
    kw = dict(max_new_tokens=budget, temperature=b.temperature, top_p=b.top_p, num_samples=n, stop_ids=stops, seed=2)
    print(f"prompt {len(prompt)} tokens, {n} samples, <= {budget} new tokens", flush=True)
    rows, outs = [], {}
    for mode, (share, cap) in MODES.items():
        G.SHARED_PREFIX_MAX_PROMPTS, G.MAX_ROWS = share, cap
        G.release(model)
        generate = G.generate
        if cuda:
            generate(model, [prompt], **kw)  # compile, capture
            comps, sec, peak = timed(lambda: generate(model, [prompt], **kw))
        else:
            t = time.perf_counter()
            comps, peak = generate(model, [prompt], **kw), 0
            sec = time.perf_counter() - t
        lengths = [len(c.tokens) for c in comps]
        floor = floor_seconds(model, len(prompt), lengths, share > 0, bw, flops) if cuda else float("nan")
        outs[mode] = comps
        rows.append(dict(mode=mode, seconds=sec, new_tokens=sum(lengths), tok_s=sum(lengths) / sec,
                         longest=max(lengths), floor_s=floor, pct_of_floor=100 * floor / sec, peak_gib=peak / 2**30))
        print(rows[-1], flush=True)
    ref = outs["per-row"]
    for r in rows:
        r["same_tokens_as_per_row"] = sum(a.tokens == c.tokens for a, c in zip(outs[r["mode"]], ref)) / n
    print("\n| mode | s | new tokens | tok/s | longest | floor s | % of floor | peak GiB | same tokens as per-row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['new_tokens']:,} | {r['tok_s']:,.0f} | {r['longest']} | "
              f"{r['floor_s']:.2f} | {r['pct_of_floor']:.0f}% | {r['peak_gib']:.1f} | {r['same_tokens_as_per_row']:.0%} |")
    write_json(args.out, dict(device=device_line() if cuda else "cpu", prompt_tokens=len(prompt), samples=n, rows=rows))


if __name__ == "__main__":
    main()
