"""One MQuAKE-hard case (4 edits) of CausalEdit on the embedded SmolLM2-135M, timed by stage: the bootstrap
cache cold, the process warm (a first case, which compiles and captures, runs before the timed one; each
gets its own empty cache folder). Prints each stage's seconds, what it did (tokens, steps, SFT padding)
and its compute floor at the measured bf16 matmul rate: 2 flops per parameter per sampled or scored
token, 4 per trained token (the base is frozen: forward and input gradients). Issue P10's target for the
whole case is 40 s on an H200 at the paper recipe. Each stage is broken down by wrapping its parts
(`Breakdown`): the bootstrap's generate calls and reward scoring, SFT's graph captures and replays (GPU
time by CUDA events) and optimizer steps, the distillation steps' generate / teacher / student seconds.

GPU:  cd bench && PYTHONPATH=.. python smollm2_case.py [--out smollm2_case.json]
CPU smoke (a random 2-layer model, the tiny preset):  ... --device cpu --preset tiny
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import Breakdown, matmul_params, write_json
from code_edit.config import load_hparams
from code_edit.data import edit_requests, load_dataset
from code_edit.editor import Editor
from model import load_model, load_tokenizer

WARM_CASE, TIMED_CASE = 0, 1  # indices among the cases that have articles


def instrument(cuda: bool) -> Breakdown:
    """The wrapped parts (see Breakdown): generate and reward scoring, graph captures and replays (decode
    steps and SFT steps alike), optimizer steps and batch packing (host seconds), distillation steps."""
    import code_edit.bootstrap as B
    import model.cuda_graph as CG
    import train.distill as D
    import train.sft as S

    bd = Breakdown(cuda)
    bd.follow_stages()
    bd.timed(B, "generate", "generate",
             count=lambda out: {"rows": len(out), "longest": max((len(c.tokens) for c in out), default=0)})
    bd.timed(B, "span_mean_logprobs", "reward scoring")
    bd.timed(CG.GraphedStep, "__init__", "graph capture",  # warm-up runs, then the recording
             note=lambda g, fn, example, **k: [tuple(x.shape) for x in example[:3]])
    bd.span(torch.cuda.graph, "__enter__", "__exit__", "graph capture: recording")
    bd.gpu_timed(CG.GraphedStep, "__call__", "graph replay")
    bd.timed(torch.optim.AdamW, "step", "optimizer step (host)", sync=False)
    bd.timed(S, "pack_stream", "pack_stream (host)", sync=False)
    bd.timed(D.Distiller, "compute_gradients", "distill",
             count=lambda out: {k: out[k] for k in ("generate_s", "teacher_s", "student_s")})
    return bd


def stage_floors(rec: dict, n_params: int, flops: float) -> dict[str, dict]:
    """Per stage: seconds, the counts the stats give, and the compute floor in seconds."""
    st, es = rec["stages"], rec["edit_stats"]
    boot, sft, it = es.get("bootstrap", {}), es.get("sft", {}), es.get("internalize", {})
    trained = sft.get("positions", 0) * (1 - sft.get("padding", 0.0))
    out = {
        "bootstrap": {"sampled_tokens": boot.get("sampled_tokens"), "candidates": boot.get("candidates"),
                      "floor_s": 2 * n_params * boot.get("sampled_tokens", 0) / flops},
        "sft": {"steps": sft.get("steps"), "graphs": sft.get("graphs"), "padding": sft.get("padding"),
                "trained_tokens": int(trained), "floor_s": 4 * n_params * trained / flops},
        "internalize": {"steps": it.get("steps"), "floor_s": None},
        "eval": {"floor_s": None},
    }
    for name, row in out.items():
        row["seconds"] = st.get(name, {}).get("seconds")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    cfg = load_hparams(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = load_model(cfg.model.source, dtype=dtype, device=args.device)
    tok = load_tokenizer(cfg.model.source)
    cases = [c for c in load_dataset("MQuAKE-hard") if all(r.get("article") for r in c["requested_rewrite"])]
    flops = float("nan")
    if cuda:
        from common import device_line, measure_matmul_flops
        flops = measure_matmul_flops()
        print(f"device: {device_line()}; bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    n_params = matmul_params(model)
    with tempfile.TemporaryDirectory() as tmp:
        editor = Editor(model, tok, cfg, "CausalEdit", model_id=str(cfg.model.source))
        records, bd = {}, instrument(cuda)
        for name, idx in (("warm-up", WARM_CASE), ("timed", TIMED_CASE)):
            editor.cache_dir = Path(tmp) / name  # cold: nothing cached for this case
            case = cases[idx]
            bd.on = name == "timed"
            (rec,) = editor.run_unit(f"case-{case['case_id']}", edit_requests(case), [case])
            records[name] = rec
            print(f"{name} case {case['case_id']}: {sum(s['seconds'] for s in rec['stages'].values()):.1f} s "
                  f"{ {k: v['seconds'] for k, v in rec['stages'].items()} }", flush=True)
        parts = bd.read()
        slow = sorted(bd.calls, key=lambda c: -c[1])[:12]
        bd.undo()
    rows = stage_floors(records["timed"], n_params, flops)
    total = sum(r["seconds"] or 0 for r in rows.values())
    print("\n| stage | seconds | compute floor s | what it did |\n|---|---:|---:|---|")
    for name, r in rows.items():
        fl = "—" if r["floor_s"] is None else f"{r['floor_s']:.2f}"
        did = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("seconds", "floor_s") and v is not None)
        print(f"| {name} | {r['seconds']:.1f} | {fl} | {did} |")
    print(f"| **case** | **{total:.1f}** | | target 40 s (issue P10) |")
    print("\nparts of the timed case (wrapped calls; 'gpu s' by CUDA events):")
    for k, v in parts.items():
        print(f"  {k:40s} {v}")
    print("slowest graph captures (stage, seconds, first input shapes):")
    for c in slow:
        print("  ", *c)
    write_json(args.out, {"preset": args.preset, "device": args.device, "matmul_flops": flops,
                          "case_id": records["timed"]["case_id"], "stages": rows, "total_s": total,
                          "parts": parts, "slowest_captures": slow})


if __name__ == "__main__":
    main()
