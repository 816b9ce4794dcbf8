"""Benchmark train.losses.distill_loss against a naive full-logits implementation (forward + backward).

GPU: `python bench/losses.py --out bench_losses.json` (Qwen2.5-7B head: V=152,064, H=3,584, bf16).
CPU smoke run: `python bench/losses.py --small --out /tmp/bench_losses.json`. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.losses import distill_loss  # noqa: E402


def naive_distill(hs, ht, W, w, direction, top_k):
    """What a trainer does without fusion: [N, V] logits from the lm_head, upcast, masked log-softmax."""
    zs = (hs @ W.T).float()
    with torch.no_grad():
        zt = (ht @ W.T).float()
        mask = None
        if top_k:
            mask = torch.zeros_like(zs, dtype=torch.bool)
            mask.scatter_(1, zt.topk(top_k, dim=1).indices, True)
            mask.scatter_(1, zs.topk(top_k, dim=1).indices, True)
            zt = zt.masked_fill(~mask, -math.inf)
        lt = zt.log_softmax(1)
        pt = lt.exp()
    if mask is not None:
        zs = zs.masked_fill(~mask, -math.inf)
    ls = zs.log_softmax(1)
    if mask is not None:  # drop the -inf logs off the support (0 * -inf would be NaN)
        ls = torch.where(mask, ls, torch.zeros_like(ls))
        lt = torch.where(mask, lt, torch.zeros_like(lt))
    if direction == "forward":
        kl = (pt * (lt - ls)).sum(1)
    else:
        kl = (ls.exp() * (ls - lt)).sum(1)
    w = w.float()
    return (w * kl).sum() / w.sum().clamp_min(1e-8)


def fused_distill(hs, ht, W, w, direction, top_k):
    return distill_loss(hs, ht, W, w, direction=direction, top_k=top_k)


def run_once(fn, hs, ht, W, w, direction, top_k):
    hs.grad = None
    loss = fn(hs, ht, W, w, direction, top_k)
    loss.backward()
    return loss.detach(), hs.grad


def measure(fn, inputs, direction, top_k, device, warmup, iters):
    """Median fwd+bwd milliseconds and peak memory of one call; ('OOM', ...) if it does not fit."""
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            run_once(fn, *inputs, direction, top_k)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss, grad = run_once(fn, *inputs, direction, top_k)
        peak = extra = None
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            extra = peak - base
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_once(fn, *inputs, direction, top_k)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run_once(fn, *inputs, direction, top_k)
                times.append((time.perf_counter() - t0) * 1e3)
        return "ok", statistics.median(times), peak, extra, loss.float(), grad.float().clone()
    except torch.OutOfMemoryError:
        inputs[0].grad = None
        if cuda:
            torch.cuda.empty_cache()
        return "OOM", None, None, None, None, None


def cell(d: dict, key: str, spec: str, width: int) -> str:
    """One table cell: the formatted number, OOM, or '-' when not measured."""
    value = d.get(key)
    text = format(value, spec) if value is not None else ("OOM" if d.get("status") == "OOM" else "-")
    return f"{text:>{width}}"


def gib(x):
    return None if x is None else x / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.small:
        vocab, hidden, tokens = 4099, 64, [64, 128, 256]
    else:
        vocab, hidden, tokens = 152_064, 3_584, [1024, 2048, 4096, 8192]
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    dtype = torch.bfloat16

    g = torch.Generator(device=device).manual_seed(0)
    # Logit std ~2.5, about what an instruct model's head produces (keeps the top-k away from mass ties).
    W = (torch.randn(vocab, hidden, generator=g, device=device) * (2.5 / hidden**0.5)).to(dtype)
    results = []
    header = (f"{'tokens':>6} {'dir':>7} {'top_k':>5} | {'fused ms':>9} {'naive ms':>9} {'speedup':>7} | "
              f"{'fused GiB':>9} {'naive GiB':>9} {'f+GiB':>7} {'n+GiB':>7} | {'rel loss':>8} {'rel grad':>8}")
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"V={vocab} H={hidden} dtype=bf16; GiB = peak allocated incl. inputs and W; +GiB = above the "
          f"memory held before the call;\nrel loss/grad = fused vs naive (the naive rounds logits to bf16, "
          f"so its top-k sets can differ at near-ties)")
    print(header)
    print("-" * len(header))
    for n in tokens:
        hs = torch.randn(n, hidden, generator=g, device=device).to(dtype).requires_grad_()
        ht = (hs.detach().float() + 0.5 * torch.randn(n, hidden, generator=g, device=device)).to(dtype)
        w = torch.rand(n, generator=g, device=device)
        inputs = (hs, ht, W, w)
        for direction in ("forward", "reverse"):
            for top_k in (24, 0):
                row = {"tokens": n, "direction": direction, "top_k": top_k}
                out = {}
                for name, fn in (("fused", fused_distill), ("naive", naive_distill)):
                    status, ms, peak, extra, loss, grad = measure(fn, inputs, direction, top_k, device,
                                                                  args.warmup, args.iters)
                    out[name] = (loss, grad)
                    row[name] = {"status": status, "time_ms": ms, "peak_gib": gib(peak),
                                 "peak_extra_gib": gib(extra)}
                (lf, gf), (ln, gn) = out["fused"], out["naive"]
                if lf is not None and ln is not None:
                    row["rel_err_loss"] = ((lf - ln).abs() / ln.abs()).item()
                    row["rel_err_grad"] = ((gf - gn).norm() / gn.norm()).item()
                del out, lf, gf, ln, gn
                results.append(row)
                f, nv = row["fused"], row["naive"]
                speed = nv["time_ms"] / f["time_ms"] if f["time_ms"] and nv["time_ms"] else None
                print(f"{n:>6} {direction:>7} {top_k:>5} | {cell(f, 'time_ms', '.1f', 9)} "
                      f"{cell(nv, 'time_ms', '.1f', 9)} {cell({'x': speed}, 'x', '.2f', 7)} | "
                      f"{cell(f, 'peak_gib', '.2f', 9)} {cell(nv, 'peak_gib', '.2f', 9)} "
                      f"{cell(f, 'peak_extra_gib', '.2f', 7)} {cell(nv, 'peak_extra_gib', '.2f', 7)} | "
                      f"{cell(row, 'rel_err_loss', '.1e', 8)} {cell(row, 'rel_err_grad', '.1e', 8)}", flush=True)
        del hs, ht, w, inputs

    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "vocab": vocab, "hidden": hidden, "dtype": "bfloat16",
            "warmup": args.warmup, "iters": args.iters,
            "notes": "time_ms = median forward+backward; peak_gib = torch.cuda.max_memory_allocated during one "
                     "call (includes W and inputs); peak_extra_gib = peak minus memory allocated before the call"}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
