"""Decode-step modes on SmolLM2-135M (GPU): CUDA-graph replay of eager kernels (the default) against
graph replay of the regionally compiled block (CODE_EDIT_COMPILE_DECODE=1), at the method's two shapes:
one distillation step's rollouts (4 prompts x 9 samples x 180 tokens, LoRA r12 on) and one edit's
candidates (one 640-token prompt x 1,200 samples x 256 tokens, LoRA off). No stop token, so every row
runs to the limit and both modes do the same work. Each shape is timed on a first call (compilation,
capture) and a second identical call.

GPU:  cd bench && PYTHONPATH=.. python decode_modes.py [--out decode_modes.json]
CPU smoke (fp32, shapes cut to 2 samples x 8 tokens; the flag only acts on CUDA):  ... --device cpu
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import device_line, write_json
from model import generate, load_model
from model.lora import LoraConfig, add_lora, disabled

SHAPES = {  # name: (prompt lengths, samples, new tokens, LoRA on)
    "distillation 4 x 9 x 180": ([250, 231, 262, 244], 9, 180, True),
    "candidates 1 x 1200 x 256": ([640], 1200, 256, False),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call(model, prompts, samples, new, lora_on):
    sync()
    t = time.perf_counter()
    if lora_on:
        out = generate(model, prompts, max_new_tokens=new, num_samples=samples, temperature=1.0, top_p=0.9,
                       seed=1, stop_ids=[])
    else:
        with disabled(model):
            out = generate(model, prompts, max_new_tokens=new, num_samples=samples, temperature=0.9, top_p=0.95,
                           seed=1, stop_ids=[])
    sync()
    return time.perf_counter() - t, [c.tokens for c in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cpu = a.device == "cpu"
    if not cpu:
        print(device_line(), flush=True)
    model = load_model("smollm2-135m-instruct", device=a.device, dtype=torch.float32 if cpu else None)
    add_lora(model, LoraConfig(rank=12, alpha=24, dropout=0.05, seed=3407))
    rows, tokens = [], {}
    for mode, flag in (("graphs", "0"), ("regional compile", "1")):  # compiled blocks stay on once asked for
        os.environ["CODE_EDIT_COMPILE_DECODE"] = flag
        for name, (lens, samples, new, lora_on) in SHAPES.items():
            if cpu:
                samples, new = 2, 8
            prompts = [torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lens]
            first, _ = call(model, prompts, samples, new, lora_on)
            second, toks = call(model, prompts, samples, new, lora_on)
            same = None
            if mode != "graphs":
                ref = tokens[name]
                same = sum(x == y for x, y in zip(toks, ref)) / len(ref)
            tokens.setdefault(name, toks)
            rows.append({"mode": mode, "shape": name, "first_s": round(first, 2), "second_s": round(second, 3),
                         "ms_per_step": round(second / new * 1e3, 2), "tok_s": round(len(toks) * new / second),
                         "same_tokens_as_graphs": same})
            print(rows[-1], flush=True)
    print("\n| shape | mode | first call s | second call s | ms / decode step | tok/s | same samples as graphs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        same = "-" if r["same_tokens_as_graphs"] is None else f"{100 * r['same_tokens_as_graphs']:.0f}%"
        print(f"| {r['shape']} | {r['mode']} | {r['first_s']} | {r['second_s']} | {r['ms_per_step']} | "
              f"{r['tok_s']:,} | {same} |")
    write_json(a.out, rows)


if __name__ == "__main__":
    main()
