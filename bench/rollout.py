"""Rollout-engine benchmark (GPU): our `generate` against transformers `generate` on the same weights.

Random-init Qwen2.5-7B in bf16, sampling to the length limit (no EOS), three shapes from the method:
(a) 1 x 256 new tokens, (b) 4 prompts x 9 samples x 180 (one distillation step), (c) 256 x 512 (candidates).
Usage: python bench/rollout.py [--out rollout.json] [--skip-hf] [--layers N]
The decode step is compiled regionally (the default; CODE_EDIT_COMPILE_DECODE=0 measures graph replay of
eager kernels). BENCHMARKS.md's table predates that: it was measured with a whole-step compile.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import QWEN25_7B, device_line, hf_twin, measure_bandwidth, measure_matmul_flops, random_model, timed, \
    write_json
from model import generate

CASES = {  # name: (prompts, samples, prompt length, new tokens)
    "a: 1 x 256": (1, 1, 32, 256),
    "b: 4 prompts x 9 x 180": (4, 9, 160, 180),
    "c: 4 prompts x 64 x 512": (4, 64, 512, 512),
}


def floor_seconds(model, n_seq: int, prompt_len: int, new: int, bw: float, flops: float) -> float:
    """Sum over decode steps of max(bytes / bandwidth, flops / matmul peak): weights once per step,
    each sequence's KV cache read once per step, 2 flops per parameter per token."""
    cfg = model.config
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nparams = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # embedding is a gather
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    total = 0.0
    for t in range(new):
        bytes_t = wbytes + n_seq * (prompt_len + t) * kv_tok
        total += max(bytes_t / bw, 2 * nparams * n_seq / flops)
    return total


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--cases", default="abc")
    args = ap.parse_args()

    bw, flops = measure_bandwidth(), measure_matmul_flops()
    print(f"device: {device_line()}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {flops / 1e12:.0f} TFLOP/s",
          flush=True)
    model = random_model(QWEN25_7B, layers=args.layers)
    hf = None if args.skip_hf else hf_twin(model)
    rows = []
    for key, (n_p, n_s, plen, new) in CASES.items():
        if key[0] not in args.cases:
            continue
        prompts = prompts_for(n_p, plen, model.config.vocab_size, seed=1)
        run = lambda: generate(model, prompts, max_new_tokens=new, temperature=1.0, top_p=0.9,  # noqa: E731
                               num_samples=n_s, stop_ids=[], seed=0)
        t0 = time.perf_counter()
        run()  # first call: compilation and graph capture
        warm = time.perf_counter() - t0
        out, sec, peak = timed(run)
        ntok = sum(len(c.tokens) for c in out)
        assert ntok == n_p * n_s * new, ntok
        floor = floor_seconds(model, n_p * n_s, plen, new, bw, flops)
        row = {"case": key, "tokens": ntok, "ours_s": sec, "ours_tok_s": ntok / sec, "ours_peak_gib": peak / 2**30,
               "first_call_s": warm, "floor_s": floor, "pct_of_floor": 100 * floor / sec}
        print(f"{key}: ours {ntok / sec:,.0f} tok/s ({sec:.2f} s, first call {warm:.1f} s), "
              f"{row['pct_of_floor']:.0f}% of floor, peak {peak / 2**30:.1f} GiB", flush=True)
        if hf is not None:
            ids = torch.tensor(prompts, device="cuda").repeat_interleave(n_s, 0)
            hf_run = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,  # noqa: E731
                                         min_new_tokens=new, do_sample=True, temperature=1.0, top_p=0.9,
                                         top_k=0, eos_token_id=None, pad_token_id=0)
            with torch.inference_mode():
                hf_run()
                o, hsec, hpeak = timed(hf_run)
            assert o.shape[1] - plen == new
            row.update(hf_s=hsec, hf_tok_s=ntok / hsec, hf_peak_gib=hpeak / 2**30, speedup=hsec / sec)
            print(f"{key}: transformers {ntok / hsec:,.0f} tok/s ({hsec:.2f} s), peak {hpeak / 2**30:.1f} GiB; "
                  f"ours is {hsec / sec:.1f}x", flush=True)
        rows.append(row)
    if "b" in args.cases:  # the distillation step as the method runs it: the student's LoRA on
        from model.lora import LoraConfig, add_lora

        add_lora(model, LoraConfig(rank=12, alpha=24, dropout=0.0))
        n_p, n_s, plen, new = CASES["b: 4 prompts x 9 x 180"]
        prompts = prompts_for(n_p, plen, model.config.vocab_size, seed=1)
        run = lambda: generate(model, prompts, max_new_tokens=new, temperature=1.0, top_p=0.9,  # noqa: E731
                               num_samples=n_s, stop_ids=[], seed=0)
        t0 = time.perf_counter()
        run()
        warm = time.perf_counter() - t0
        out, sec, peak = timed(run)
        ntok = sum(len(c.tokens) for c in out)
        floor = floor_seconds(model, n_p * n_s, plen, new, bw, flops)
        rows.append({"case": "b + LoRA r12 (student rollouts)", "tokens": ntok, "ours_s": sec,
                     "ours_tok_s": ntok / sec, "ours_peak_gib": peak / 2**30, "first_call_s": warm, "floor_s": floor,
                     "pct_of_floor": 100 * floor / sec})
        print(f"b + LoRA: ours {ntok / sec:,.0f} tok/s ({sec:.2f} s, first call {warm:.1f} s)", flush=True)
    print("\n| case | ours tok/s | % of floor | transformers tok/s | ratio | ours peak GiB | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_tok_s']:,.0f} | {r['pct_of_floor']:.0f}% | "
              f"{r.get('hf_tok_s', float('nan')):,.0f} | {r.get('speedup', float('nan')):.1f}x | "
              f"{r['ours_peak_gib']:.1f} | {r['first_call_s']:.0f} |")
    write_json(args.out, {"device": device_line(), "bandwidth": bw, "matmul_flops": flops, "rows": rows})


if __name__ == "__main__":
    main()
