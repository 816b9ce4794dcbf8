"""Where a packed SFT step's time goes (GPU, issue P10): SmolLM2-135M with the preset's LoRA, trained on a
real case's 100 SFT examples (bench/runs/p10/sft_rows_7774.json) at the preset's batch, learning rate and
schedule, as a case runs it. Per packing step (train.sft.PACK_STEP): seconds whole and by part (graph
captures, replays' GPU time, optimizer and packing on the host); then the kernels of uncaptured steps by
kind, per step (kernel times are those inside a graph; only the launch gaps differ).

GPU:  cd bench && PYTHONPATH=.. python profile_sft.py [--epochs 125] [--pack-steps 256 1024]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import json
import time
from pathlib import Path

import torch

import model.cuda_graph as CG
import train.sft as S
from common import Breakdown, device_line
from code_edit.bootstrap import run_sft
from code_edit.config import load_hparams
from model import load_model
from model.lora import LoraConfig, add_lora, reset
from profile_decode import report_kernels

ROWS = Path(__file__).parent / "runs" / "p10" / "sft_rows_7774.json"


def run(model, ex, cfg, epochs: int) -> dict:
    """The preset's SFT (code_edit.bootstrap.run_sft) for `epochs`, without the early stop."""
    b = dataclasses.replace(cfg.bootstrap, epochs=epochs, early_stop_loss=None)
    return run_sft(model, ex, dataclasses.replace(cfg, bootstrap=b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=125)
    ap.add_argument("--pack-steps", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    cfg = load_hparams("smollm2-135m-instruct")
    ex = [(p, c) for p, c in json.load(open(ROWS))["examples"]]
    model = load_model(cfg.model.source, dtype=torch.bfloat16, device="cuda")
    lc = cfg.lora
    add_lora(model, LoraConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.target_modules,
                               seed=lc.init_seed))
    print(f"device: {device_line()}; {len(ex)} examples, {args.epochs} epochs", flush=True)
    t = time.perf_counter()
    run(model, ex, cfg, 2)  # compiles the blocks
    print(f"warm-up (compile) {time.perf_counter() - t:.1f} s", flush=True)

    # 1) the run a case makes, by part
    bd = Breakdown(True)
    bd.timed(CG.GraphedStep, "__init__", "graph capture")
    bd.gpu_timed(CG.GraphedStep, "__call__", "graph replay")
    bd.timed(torch.optim.AdamW, "step", "optimizer step (host)", sync=False)
    bd.timed(S, "pack_stream", "pack_stream (host)", sync=False)
    bd.on, bd.stage = True, "sft"
    default_step = S.PACK_STEP
    for step in args.pack_steps:
        S.PACK_STEP = step
        reset(model, lc.init_seed)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = run(model, ex, cfg, args.epochs)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        parts = bd.read()
        print(f"\nPACK_STEP {step}: {dt:.2f} s, {out['steps']} steps = {dt / out['steps'] * 1e3:.1f} ms/step; "
              f"graphs {out['graphs']}, padding {out['padding']:.3f}, positions {out['positions']:,}", flush=True)
        for k, v in parts.items():
            print(f"  {k:40s} {v}")
    S.PACK_STEP = default_step
    bd.undo()

    # 2) kernels of uncaptured steps, by kind
    reset(model, lc.init_seed)
    os.environ["CODE_EDIT_CUDA_GRAPHS"] = "0"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run(model, ex, cfg, 2)
        torch.cuda.synchronize()
    print(f"\nuncaptured steps: {out['steps']}")
    report_kernels(prof, out["steps"], args.top)


if __name__ == "__main__":
    main()
