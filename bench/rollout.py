"""Rollout-engine benchmark (GPU): our `generate` against transformers `generate` on the same weights.

Random-init Qwen2.5-7B in bf16, sampling to the length limit (no EOS), the method's shapes: (a) 1 x 256
new tokens, (b) 4 prompts x 9 samples x 180 (one distillation step; also with the student's LoRA on,
unmerged as generate samples it by default, and merged, CODE_EDIT_MERGE_LORA=1), (c) 4 prompts x 64 x 512 (candidates),
(d) 1 prompt of 640 tokens x 1,200 samples x 896 (one edit's stage-1 candidates; ours only: transformers
would need a 1,200-row cache of the whole sequence).
Usage: python bench/rollout.py [--out rollout.json] [--skip-hf] [--layers N] [--cases abcd]
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

from common import QWEN25_7B, device_line, hf_twin, matmul_params, measure_bandwidth, measure_matmul_flops, \
    random_model, timed, write_json
from model import generate

generate_mod = importlib.import_module("model.generate")

CASES = {  # name: (prompts, samples, prompt length, new tokens)
    "a: 1 x 256": (1, 1, 32, 256),
    "b: 4 prompts x 9 x 180": (4, 9, 160, 180),
    "c: 4 prompts x 64 x 512": (4, 64, 512, 512),
    "d: 1 prompt x 1200 x 896 (bootstrap)": (1, 1200, 640, 896),
}
NO_HF = {"d"}


def floor_seconds(model, n_prompts: int, n_samples: int, prompt_len: int, new: int, bw: float, flops: float) -> float:
    """Sum over decode steps of max(bytes / bandwidth, flops / matmul peak): weights once per step, the
    KV cache read once per step (a prompt the engine keeps as a shared prefix counted once, else once per
    row), 2 flops per parameter per token."""
    cfg = model.config
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nparams = matmul_params(model)
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    n_seq = n_prompts * n_samples
    shared = n_samples >= 2 and n_prompts <= generate_mod.SHARED_PREFIX_MAX_PROMPTS
    total = 0.0
    for t in range(new):
        slots = n_prompts * prompt_len + n_seq * t if shared else n_seq * (prompt_len + t)
        total += max((wbytes + slots * kv_tok) / bw, 2 * nparams * n_seq / flops)
    return total


def _us(fn, *args) -> float:
    """Microseconds per call on the GPU (3 warm-up calls, then 20 timed by CUDA events)."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        fn(*args)
    e.record()
    torch.cuda.synchronize()
    return 1e3 * s.elapsed_time(e) / 20


def attention_alone(bw: float) -> list[dict]:
    """One layer's decode attention at the last step of (c) and (d): the Triton kernel against the torch
    form, and against reading the own keys/values, the prefix once and the mask at copy bandwidth."""
    from check_gpu import attention_case
    from model import decode_attention as DA
    from model.decode_attention import decode_attention
    from model.decoder import _attend_decode
    rows = []
    for name, shape, n_p in (("c: 256 rows, prefix 4 x 512, 512 own", (256, 4, 7, 128, 2048, 512), 4),
                             ("d: 1,200 rows, prefix 640, 896 own", (1200, 4, 7, 128, 640, 896), 1)):
        q, k, v, mask, pre = attention_case(*shape, torch.bfloat16, prompts=n_p, ragged=False)
        B, kv, _, D, L, S = shape
        nbytes = (2 * B * kv * S * D + 2 * kv * L * D) * 2 + B * (L + S)
        row = {"case": name, "floor_us": 1e6 * nbytes / bw,
               "kernel_us": _us(decode_attention, q, k, v, mask, pre), "torch_us": _us(_attend_decode, q, k, v, mask, pre)}
        names = ("PREFIX_SLOTS", "OWN_SLOTS", "OWN_STAGES")
        default = tuple(getattr(DA, n) for n in names)
        for tiles in ((64, 64, 3), (128, 128, 2), (128, 64, 2), (128, 32, 4)):  # the kernels' tiles, beside the default
            for n, t in zip(names, tiles):
                setattr(DA, n, t)
            row["kernel_us_" + "_".join(map(str, tiles))] = _us(decode_attention, q, k, v, mask, pre)
        for n, t in zip(names, default):
            setattr(DA, n, t)
        print(f"  tiles (prefix slots, own slots, own stages): {default}: {row['kernel_us']:.0f} us; " + ", ".join(
            f"{k.split('us_')[1]}: {v:.0f} us" for k, v in row.items() if k.startswith("kernel_us_")), flush=True)
        print(f"attention alone, {name}: kernel {row['kernel_us']:.0f} us, torch form {row['torch_us']:.0f} us "
              f"({row['torch_us'] / row['kernel_us']:.1f}x), floor {row['floor_us']:.0f} us "
              f"({100 * row['floor_us'] / row['kernel_us']:.0f}% of it)", flush=True)
        rows.append(row)
    return rows


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def time_ours(model, name: str, prompts: list[list[int]], n_s: int, new: int, floor: float) -> dict:
    """Our generate on `prompts`: a first call (compilation, graph capture), then the timed identical call."""
    run = lambda: generate(model, prompts, max_new_tokens=new, temperature=1.0, top_p=0.9,  # noqa: E731
                           num_samples=n_s, stop_ids=[], seed=0)
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    out, sec, peak = timed(run)
    ntok = sum(len(c.tokens) for c in out)
    row = {"case": name, "tokens": ntok, "ours_s": sec, "ours_tok_s": ntok / sec, "ours_peak_gib": peak / 2**30,
           "first_call_s": warm, "floor_s": floor, "pct_of_floor": 100 * floor / sec}
    print(f"{name}: ours {ntok / sec:,.0f} tok/s ({sec:.2f} s, first call {warm:.1f} s), "
          f"{row['pct_of_floor']:.0f}% of floor, peak {peak / 2**30:.1f} GiB", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--cases", default="abcd")
    args = ap.parse_args()

    bw, flops = measure_bandwidth(), measure_matmul_flops()
    print(f"device: {device_line()}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {flops / 1e12:.0f} TFLOP/s",
          flush=True)
    attention = attention_alone(bw)
    model = random_model(QWEN25_7B, layers=args.layers)
    hf = None if args.skip_hf else hf_twin(model)
    rows = []
    for key, (n_p, n_s, plen, new) in CASES.items():
        if key[0] not in args.cases:
            continue
        prompts = prompts_for(n_p, plen, model.config.vocab_size, seed=1)
        row = time_ours(model, key, prompts, n_s, new, floor_seconds(model, n_p, n_s, plen, new, bw, flops))
        assert row["tokens"] == n_p * n_s * new, row["tokens"]
        if hf is not None and key[0] not in NO_HF:
            ids = torch.tensor(prompts, device="cuda").repeat_interleave(n_s, 0)
            hf_run = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,  # noqa: E731
                                         min_new_tokens=new, do_sample=True, temperature=1.0, top_p=0.9,
                                         top_k=0, eos_token_id=None, pad_token_id=0)
            with torch.inference_mode():
                hf_run()
                o, hsec, hpeak = timed(hf_run)
            assert o.shape[1] - plen == new
            sec = row["ours_s"]
            row.update(hf_s=hsec, hf_tok_s=row["tokens"] / hsec, hf_peak_gib=hpeak / 2**30, speedup=hsec / sec)
            print(f"{key}: transformers {row['tokens'] / hsec:,.0f} tok/s ({hsec:.2f} s), peak {hpeak / 2**30:.1f} "
                  f"GiB; ours is {hsec / sec:.1f}x", flush=True)
        rows.append(row)
    if "b" in args.cases:  # the distillation step as the method runs it: the student's LoRA on
        from model.lora import LoraConfig, add_lora

        add_lora(model, LoraConfig(rank=12, alpha=24, dropout=0.0))
        n_p, n_s, plen, new = CASES["b: 4 prompts x 9 x 180"]
        prompts = prompts_for(n_p, plen, model.config.vocab_size, seed=1)
        floor = floor_seconds(model, n_p, n_s, plen, new, bw, flops)
        try:
            for merge, name in (("0", "unmerged (the default)"), ("1", "merged (CODE_EDIT_MERGE_LORA=1)")):
                os.environ["CODE_EDIT_MERGE_LORA"] = merge
                rows.append(time_ours(model, f"b + LoRA r12 (student rollouts), {name}", prompts, n_s, new, floor))
        finally:
            os.environ.pop("CODE_EDIT_MERGE_LORA", None)
    print("\n| case | ours tok/s | % of floor | transformers tok/s | ratio | ours peak GiB | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_tok_s']:,.0f} | {r['pct_of_floor']:.0f}% | "
              f"{r.get('hf_tok_s', float('nan')):,.0f} | {r.get('speedup', float('nan')):.1f}x | "
              f"{r['ours_peak_gib']:.1f} | {r['first_call_s']:.0f} |")
    write_json(args.out, {"device": device_line(), "bandwidth": bw, "matmul_flops": flops, "rows": rows,
                          "attention_alone": attention})


if __name__ == "__main__":
    main()
