"""Where a generate call's time goes (GPU): the decode graph against everything outside it, and the
kernels by kind (GEMMs, fused Triton, top-k, noise, indexing), for one shape of the method.
Random-init Qwen2.5-7B (or `--smollm2`: the embedded SmolLM2-135M in bf16), no stop token. Run with
TORCH_LOGS=recompiles to see recompiles: the script prints a marker before the timed calls, so any
recompile line after it is one a real run would pay.

Usage: python bench/profile_decode.py --prompts 4 --samples 64 --prompt-len 512 [--new 128] [--lora] [--layers N]
       (the distillation step's rollouts: --smollm2 --lora --prompts 4 --samples 9 --prompt-len 128 --new 180;
       the 7B evaluation: --prompts 99 --samples 1 --prompt-len 180 --new 768 --temperature 0 --repetition-penalty 1.1 --lora)
The attention is batched matmuls (counted under "gemm") and fused Triton parts (under "triton").
"""
from __future__ import annotations

import argparse
import importlib
import re
import time
from collections import defaultdict

import torch

from common import QWEN25_7B, random_model
from model import generate

G = importlib.import_module("model.generate")

KINDS = [  # first match wins
    ("decode attention", r"^_prefix_kernel|^_own_kernel"),
    ("flash attention", r"flash|fmha"),  # before "gemm": flash's kernel names hold "cutlass"
    ("nucleus check", r"_mass_above"),
    ("gemm", r"gemm|cutlass|sm90|nvjet|cublas|splitK"),
    ("top-k", r"topk|radix|sort|bitonic|gatherTopK"),
    ("noise", r"exponential|philox|distribution|uniform"),
    ("triton (fused)", r"triton"),
    ("copy / index", r"copy|index|gather|scatter|elementwise|cat|fill"),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.I):
            return kind
    return "other"


def kernel_times(prof) -> tuple[dict[str, list], dict[str, list]]:
    """The profiled CUDA kernels' [microseconds, launches], by kind (KINDS) and by name."""
    by_kind, by_name = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and not ev.is_user_annotation:
            us = ev.time_range.elapsed_us()
            for table, key in ((by_kind, kind_of(ev.name)), (by_name, ev.name)):
                table[key][0] += us
                table[key][1] += 1
    return by_kind, by_name


def report_kernels(prof, steps: int, top: int) -> dict[str, float]:
    """Print the profiled kernels per step (`steps` of them were profiled): GPU busy time and launches, each
    kind's ms, share and launches, and the `top` kernels by time. Returns ms per step by kind."""
    by_kind, by_name = kernel_times(prof)
    busy = sum(us for us, _ in by_kind.values()) / 1e3 / steps
    print(f"GPU busy {busy:.2f} ms per step, {sum(c for _, c in by_kind.values()) / steps:.0f} kernels per step")
    for k, (us, c) in sorted(by_kind.items(), key=lambda x: -x[1][0]):
        print(f"  {k:16s} {us / 1e3 / steps:8.3f} ms/step  {100 * us / 1e3 / steps / busy:5.1f}%  "
              f"{c / steps:6.0f} kernels/step")
    print("top kernels (ms/step, kernels/step, name):")
    for name, (us, c) in sorted(by_name.items(), key=lambda x: -x[1][0])[:top]:
        print(f"  {us / 1e3 / steps:8.3f} {c / steps:6.0f}  {name[:110]}")
    return {k: us / 1e3 / steps for k, (us, _) in by_kind.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy, as evaluation decodes")
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--lora", action="store_true", help="rank-12 LoRA on all seven projections, switched on")
    ap.add_argument("--top", type=int, default=20, help="kernels listed")
    ap.add_argument("--smollm2", action="store_true", help="the embedded SmolLM2-135M instead of a random 7B")
    args = ap.parse_args()
    if args.smollm2:
        from model import load_model
        model = load_model("smollm2-135m-instruct", dtype=torch.bfloat16, device="cuda")
    else:
        model = random_model(QWEN25_7B, layers=args.layers)
    if args.lora:
        from model.lora import LoraConfig, add_lora
        add_lora(model, LoraConfig(rank=12, alpha=24, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    run = lambda: generate(model, prompts, max_new_tokens=args.new, temperature=args.temperature,  # noqa: E731
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_samples=args.samples,
                           stop_ids=[], seed=0)
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    print(f"=== first call {first:.1f} s; timed calls follow (a recompile after this line is a defect)", flush=True)

    # 1) the decode graph alone, by CUDA events around each replay
    times, real_call = [], G._Decoder.__call__

    def timed_call(self, *a):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = real_call(self, *a)
        e.record()
        times.append((s, e))
        return out

    G._Decoder.__call__ = timed_call
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) * 1e3
    G._Decoder.__call__ = real_call
    dec = sum(s.elapsed_time(e) for s, e in times)
    rows = args.prompts * args.samples
    print(f"rows {rows}, prompt {args.prompt_len}, new {args.new}, lora {args.lora}: {total:.0f} ms = "
          f"{total / args.new:.2f} ms/step ({rows * args.new / total * 1e3:,.0f} tok/s); decode graph "
          f"{dec / len(times):.2f} ms/step, outside it {(total - dec) / args.new:.2f} ms/step", flush=True)

    # 2) the kernels, by kind
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"wall {total:.0f} ms ({total / args.new:.2f} ms/step); the profiled call's kernels:")
    report_kernels(prof, args.new, args.top)


if __name__ == "__main__":
    main()
