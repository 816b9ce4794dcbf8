"""Where a decode step's time goes (GPU): graph replay vs sampling, and the top kernels, for one shape.
Usage: python bench/profile_decode.py --rows 36 --prompt 160 --new 64"""
from __future__ import annotations

import argparse
import importlib

import torch

from common import QWEN25_7B, random_model
from model import generate

G = importlib.import_module("model.generate")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=36)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    model = random_model(QWEN25_7B, layers=args.layers)
    prompts = [list(range(100, 100 + args.prompt))]
    run = lambda: generate(model, prompts, max_new_tokens=args.new, temperature=1.0, top_p=args.top_p,  # noqa
                           num_samples=args.rows, stop_ids=[], seed=0)
    run()
    # time the decode graph alone
    times = []
    real_call = G._Decoder.__call__

    def timed_call(self, *a):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = real_call(self, *a)
        e.record()
        times.append((s, e))
        return out

    G._Decoder.__call__ = timed_call
    torch.cuda.synchronize()
    s0, e0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    run()
    e0.record()
    torch.cuda.synchronize()
    G._Decoder.__call__ = real_call
    dec = sorted(s.elapsed_time(e) for s, e in times)
    total = s0.elapsed_time(e0)
    print(f"rows {args.rows}: total {total:.1f} ms for {args.new} tokens = {total / args.new:.2f} ms/step; "
          f"decode graph median {dec[len(dec) // 2]:.2f} ms/step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
