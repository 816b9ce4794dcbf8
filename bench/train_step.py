"""LoRA training benchmark (GPU): our SFT train step (eager, and with the decoder blocks compiled as
train.sft runs it) against transformers + peft on the same weights, then one full distillation step
(`train.distill.Distiller.step`) split into its phases.

Random-init Qwen2.5-7B in bf16, LoRA rank 12 / alpha 24 on all seven projections, batch 8 x 512 tokens.
GPU:   python bench/train_step.py [--out train_step.json] [--grad-ckpt] [--layers N] [--skip-hf] [--skip-distill]
CPU smoke run: python bench/train_step.py --small
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import QWEN25_7B, hf_twin, write_json  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoder import Transformer  # noqa: E402
from model.lora import DEFAULT_TARGETS, LoraConfig, add_lora  # noqa: E402
from train.distill import DistillConfig, Distiller, DistillPrompt  # noqa: E402
from train.losses import completion_ce_loss  # noqa: E402

SMALL = dict(QWEN25_7B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
SPEC_BF16 = {"H100 80GB HBM3": 989.4e12, "H200": 989.4e12, "H100 PCIe": 756.5e12}  # dense, no sparsity


def build(hf_cfg: dict, device: torch.device, layers: int | None) -> Transformer:
    """Random weights (std 0.02, norms 1) in bf16: common.random_model on CUDA, the same on the CPU."""
    if device.type == "cuda":
        from common import random_model
        return random_model(hf_cfg, layers=layers)
    cfg = dict(hf_cfg, num_hidden_layers=layers or hf_cfg["num_hidden_layers"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(cfg)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.fuse_projections()
    return model.requires_grad_(False).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def train_flops(cfg: ModelConfig, rank: int, batch: int, seq: int) -> float:
    """Useful flops of one LoRA step (frozen base), counted per token:
    - base linear weights incl. lm_head (N_base; the embedding is a gather): forward 2*N_base and, since
      the base is frozen, only the input gradient in backward, 2*N_base -> 4*N_base (not the 6*N of
      full training);
    - LoRA A and B (N_lora): forward 2, backward input + weight gradients 4 -> 6*N_lora;
    - causal attention: QK^T and PV over T(T+1)/2 pairs, 4*head_dim*heads flops per pair and layer in
      the forward, backward twice that (dQ, dK, dV, dP) -> 3x forward; no recomputation counted.
    The loss over the vocabulary is inside N_base (lm_head). Activation checkpointing's extra forward
    is not useful work and is not counted."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(H, q), (H, kv), (H, kv), (q, H), (H, I), (H, I), (I, H)]  # (in, out) of the seven projections
    n_base = L * sum(i * o for i, o in shapes) + H * cfg.vocab_size
    n_lora = L * sum(rank * (i + o) for i, o in shapes)
    tokens = batch * seq
    attn = 3 * 4 * q * L * batch * seq * (seq + 1) / 2
    return 4 * n_base * tokens + 6 * n_lora * tokens + attn


def fmt(v, spec: str, width: int) -> str:
    return format(v, f">{width}{spec}") if v is not None else f"{'-':>{width}}"


def time_steps(step, device, warmup: int, iters: int) -> tuple[float, float | None, float]:
    """Median seconds per step after `warmup` steps, peak memory over the timed steps, and the first
    step's loss (LoRA B = 0 then, so both implementations compute the base model's loss)."""
    first = float(step())
    for _ in range(warmup - 1):
        step()
    peak_reset(device)
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_gib(device), first


def ours_step_fn(model, params, ids, labels, grad_ckpt: bool):
    opt = torch.optim.AdamW(params, lr=1e-5, fused=ids.is_cuda)
    W = model.lm_head.weight
    model.gradient_checkpointing = grad_ckpt

    def step():
        h = model.hidden(ids)
        loss = completion_ce_loss(h.reshape(-1, h.shape[-1]), W, labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, opt


def hf_step_fn(hf, ids, rank: int, dropout: float, grad_ckpt: bool):
    """transformers + peft as HF's Trainer runs it with bf16=True: autocast, labels= loss, fused AdamW."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pm = get_peft_model(hf, PeftLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                           target_modules=list(DEFAULT_TARGETS), bias="none", task_type="CAUSAL_LM"))
    if grad_ckpt:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=ids.is_cuda)

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, opt, pm, sum(p.numel() for p in params)


def profile_steps(step, flops: float, peak_flops: float, n: int = 3) -> dict[str, float]:
    """GPU milliseconds per step by kernel kind (profile_decode.KINDS) over n steps, printed with the
    matmul rate the GEMMs reach against the measured peak (all counted flops credited to them)."""
    from profile_decode import report_kernels
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    print("\nkernels of ours (compiled blocks):")
    ms = report_kernels(prof, n, 15)
    if ms.get("gemm"):
        print(f"the step's counted flops over the GEMMs' time alone: {flops / ms['gemm'] * 1e3 / peak_flops:.1%} of "
              "the measured matmul rate", flush=True)
    return ms


def distill_bench(model, params, device, args) -> dict:
    """One Distiller.step at the preset shape: 4 prompts x 9 rollouts x 180 new tokens (no stop token,
    so every rollout runs to the limit), 2 micro-batches; student prompts of 96 tokens, teacher prompts
    (cheat sheet + article) of 640. The first step compiles/captures the sampler; the later ones are timed."""
    cfg = model.config
    n_prompts, rollouts, new = (2, 3, 8) if args.small else (4, 9, 180)
    s_len, t_len = (12, 40) if args.small else (96, 640)
    g = torch.Generator().manual_seed(1)
    prompts = [DistillPrompt(torch.randint(100, cfg.vocab_size - 100, (s_len,), generator=g).tolist(),
                             torch.randint(100, cfg.vocab_size - 100, (t_len,), generator=g).tolist(), i)
               for i in range(n_prompts)]
    d = Distiller(model, params, DistillConfig(lr=9e-5, max_steps=20, warmup_steps=4, rollouts_per_prompt=rollouts,
                                               micro_batches=2, max_completion_length=new,
                                               grad_checkpointing=args.grad_ckpt), stop_ids=[])
    t = time.perf_counter()
    first = d.step(prompts, seed=0)
    first_s = time.perf_counter() - t
    peak_reset(device)
    runs = [d.step(prompts, seed=1 + k) for k in range(args.distill_steps)]
    peak = peak_gib(device)
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"shape": f"{n_prompts} prompts x {rollouts} x {new}", "first_step_s": first_s,
            "generate_s": med("generate_s"), "teacher_s": med("teacher_s"), "student_s": med("student_s"),
            "step_s": med("seconds"), "peak_gib": peak, "max_logprob_diff": max(r["max_logprob_diff"] for r in runs),
            "first_max_logprob_diff": first["max_logprob_diff"], "kept_fraction": med("kept_fraction")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--small", action="store_true", help="tiny Qwen2 config on the CPU (smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=12)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of the SFT step (both sides)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (both sides)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--distill-steps", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--profile", action="store_true", help="GPU: kernels by kind over 3 compiled steps of ours")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    hf_cfg = SMALL if args.small else QWEN25_7B
    if args.small:
        args.batch, args.seq, args.iters, args.warmup = min(args.batch, 2), min(args.seq, 64), 2, 1

    from common import device_line, measure_matmul_flops
    if device.type == "cuda":
        peak_flops = measure_matmul_flops()
        name = torch.cuda.get_device_name(0)
        spec = next((v for k, v in SPEC_BF16.items() if k in name), None)
        print(f"device: {device_line()}; measured bf16 matmul {peak_flops / 1e12:.0f} TFLOP/s"
              + (f"; spec {spec / 1e12:.0f}" if spec else ""), flush=True)
    else:
        peak_flops, spec = None, None
        print(f"device: cpu (smoke run, torch {torch.__version__})", flush=True)

    model = build(hf_cfg, device, args.layers)
    hf = None if args.skip_hf else hf_twin(model, hf_cfg)  # shares our tensors; built before our LoRA
    params = add_lora(model, LoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=args.dropout))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # every next token, as labels=ids in HF
    flops = train_flops(model.config, args.rank, args.batch, args.seq)
    tokens = args.batch * args.seq
    n_lora = sum(p.numel() for p in params)

    rows = []
    model.train()
    for impl in ("ours, eager", "ours, compiled blocks"):  # train.sft compiles the blocks (not with grad ckpt)
        if impl.endswith("compiled blocks") and not model.compile_blocks():
            continue
        step, opt = ours_step_fn(model, params, ids, labels, args.grad_ckpt)
        t0 = time.perf_counter()
        sec, peak, loss = time_steps(step, device, args.warmup, args.iters)
        rows.append({"impl": impl, "step_s": sec, "tok_s": tokens / sec, "peak_gib": peak, "lora_params": n_lora,
                     "first_loss": loss, "warmup_and_timed_s": time.perf_counter() - t0})
        if args.profile and device.type == "cuda" and impl.endswith("compiled blocks"):
            rows[-1]["kernels_ms_per_step"] = profile_steps(step, flops, peak_flops)
        del step, opt
    model.gradient_checkpointing = False
    model.eval()
    if hf is not None:
        step, opt, pm, n_peft = hf_step_fn(hf, ids, args.rank, args.dropout, args.grad_ckpt)
        sec, peak, loss = time_steps(step, device, args.warmup, args.iters)
        rows.append({"impl": "transformers+peft", "step_s": sec, "tok_s": tokens / sec, "peak_gib": peak,
                     "lora_params": n_peft, "first_loss": loss})
        del step, opt, pm, hf
        peak_reset(device)

    print(f"\nLoRA train step: batch {args.batch} x {args.seq} tokens, rank {args.rank}, 7 projections, bf16, "
          f"dropout {args.dropout}, grad ckpt {'on' if args.grad_ckpt else 'off'}; "
          f"{flops / tokens / 1e9:.1f} GFLOP/token counted (see train_flops)")
    print(f"{'impl':<22} {'step s':>8} {'tok/s':>9} {'MFU meas':>8} {'MFU spec':>8} {'peak GiB':>8} "
          f"{'LoRA params':>11} {'1st loss':>8}")
    for r in rows:
        r["mfu_measured"] = flops / r["step_s"] / peak_flops if peak_flops else None
        r["mfu_spec"] = flops / r["step_s"] / spec if spec else None
        print(f"{r['impl']:<22} {r['step_s']:>8.3f} {r['tok_s']:>9,.0f} {fmt(r['mfu_measured'], '.1%', 8)} "
              f"{fmt(r['mfu_spec'], '.1%', 8)} {fmt(r['peak_gib'], '.1f', 8)} {r['lora_params']:>11,} "
              f"{r['first_loss']:>8.4f}")
    hf_row = next((r for r in rows if r["impl"] == "transformers+peft"), None)
    for r in rows:
        if hf_row is not None and r is not hf_row:
            r["speedup"] = r["tok_s"] / hf_row["tok_s"]
            print(f"speed-up {r['impl']} / transformers+peft: {r['speedup']:.2f}x")

    dist = None
    if not args.skip_distill:
        dist = distill_bench(model, params, device, args)
        print(f"\nDistiller.step ({dist['shape']}, 2 micro-batches, grad ckpt {'on' if args.grad_ckpt else 'off'}): "
              f"first step {dist['first_step_s']:.1f} s (compile + graph capture)")
        print(f"{'generate s':>10} {'teacher s':>9} {'student f+b s':>13} {'step s':>7} {'peak GiB':>8} "
              f"{'max |lp diff|':>13}")
        print(f"{dist['generate_s']:>10.2f} {dist['teacher_s']:>9.2f} {dist['student_s']:>13.2f} "
              f"{dist['step_s']:>7.2f} {fmt(dist['peak_gib'], '.1f', 8)} {dist['max_logprob_diff']:>13.4f}")
    write_json(args.out, {"config": vars(args), "flops_per_step": flops, "train_step": rows, "distill_step": dist})


if __name__ == "__main__":
    main()
