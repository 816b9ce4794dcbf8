"""Seconds and peak memory per stage of one CODE edit with the `qwen2.5-7b-instruct` preset on a random-init
Qwen2.5-7B (one GPU): an upper bound, since random weights never emit a stop token and every sample runs to
its length limit, every candidate is "valid" and scored, and SFT never stops early.

One MQuAKE-hard case = 4 edits. Prompt lengths are those of case 8772's real prompts (measured with the
SmolLM2 tokenizer, an English BPE like Qwen's): open-book 640, reward prompt 52, SFT prompt 157, student
45 / teacher 522 (internalize pool means), 99 evaluation probes of 180 tokens on average (25-377).
Stages that repeat identical work are timed on a part and scaled (printed as "scaled"): bootstrap sampling
and reward scoring on 1 of the 4 edits (x4), internalize on 3 of the 35 steps (x35), SFT from two calls of 1
and 2 epochs (one call of 125 epochs = the first + 124 x their difference: graph captures and compiling
happen once per call, so a 1-epoch call alone would overstate an epoch). Evaluation runs whole. On a GPU,
SFT is timed a second time with activation checkpointing forced on (the preset's "auto" turns it on only
where a step would not fit, as on an 80 GB card); that row is not in the total. Each stage is printed against its floor (`floors`). Results are appended
stage by stage to --out, and a rerun skips the stages already there (a device call may end between stages).

GPU:  cd bench && PYTHONPATH=.. python edit_7b.py --out /tmp/edit_7b.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from common import QWEN25_7B, matmul_params, measure_bandwidth, measure_matmul_flops, random_model
from rollout import floor_seconds
from train_step import train_flops
from code_edit.bootstrap import span_mean_logprobs
from code_edit.config import CausalEditConfig, load_hparams
from code_edit.internalize import distill_config, max_steps
from model.generate import generate, release
from model.lora import LoraConfig, add_lora, disabled, lora_parameters
from train.distill import Distiller, DistillPrompt
from train.sft import SFTConfig, sft

EDITS = 4
OPEN_BOOK, REWARD, SFT_PROMPT, STUDENT, TEACHER = 640, 52, 157, 45, 522
PROBES, PROBE_MIN, PROBE_MAX = 99, 25, 377


def toks(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1000, 150000) for _ in range(n)]


def timed(fn) -> tuple[float, float | None, object]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30 if cuda else None, out


def floors(model, cfg: CausalEditConfig, *, n_samples: int, budget: int, bw: float, flops: float) -> dict[str, float]:
    """Seconds per case (4 edits) each stage would take at the measured ceilings, for the work this script
    times: decoding as rollout.floor_seconds (weights and KV read once per step, or 2 flops per parameter
    per token, whichever is larger); forwards at 2 flops per matmul parameter per token (reward scoring
    reads logits at 10 positions only, so without the lm_head); LoRA training as train_step.train_flops.
    The teacher's and the student's lm_head flops are counted at every position (they run at completion
    positions only): those floors are ~1-2% high."""
    mc, it, r = model.config, cfg.internalize, cfg.lora.rank
    body = matmul_params(model) - mc.vocab_size * mc.hidden_size  # the lm_head apart
    sft_row = train_flops(mc, r, 1, min(SFT_PROMPT + budget + 12, cfg.bootstrap.sft_max_length) - 1)
    rows = it.prompts_per_step * it.rollouts_per_prompt
    steps = max_steps(EDITS, base=it.max_steps_base, per_extra_edit=it.max_steps_per_extra_edit)
    distill = (floor_seconds(model, it.prompts_per_step, it.rollouts_per_prompt, STUDENT, it.max_completion_length,
                             bw, flops)
               + rows * 2 * matmul_params(model) * (TEACHER + it.max_completion_length - 1) / flops
               + rows * train_flops(mc, r, 1, STUDENT + it.max_completion_length - 1) / flops)
    mean_probe = (PROBE_MIN + PROBE_MAX) / 2
    return {"bootstrap_sampling": EDITS * floor_seconds(model, 1, n_samples, OPEN_BOOK, budget, bw, flops),
            "bootstrap_reward": EDITS * n_samples * 2 * body * (REWARD + budget + 12) / flops,
            "sft": cfg.bootstrap.epochs * cfg.bootstrap.replica_times * EDITS * sft_row / flops,
            "internalize": steps * distill,
            "eval": floor_seconds(model, PROBES, 1, int(mean_probe), cfg.eval.max_new_tokens, bw, flops)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="edit_7b.json")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: a tiny model, the tiny preset")
    args = ap.parse_args()
    done = json.load(open(args.out)) if os.path.exists(args.out) else {}

    def record(stage: str, **kw):
        done[stage] = kw
        print(stage, json.dumps(kw), flush=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    cfg = load_hparams("tiny" if args.small else "qwen2.5-7b-instruct")
    b, it = cfg.bootstrap, cfg.internalize
    rng = random.Random(0)
    t = time.perf_counter()
    if args.small:
        from train_step import SMALL, build
        model = build(dict(SMALL, vocab_size=152064), torch.device("cpu"), None).float()
        bw, flops = 20e9, 1e11  # nominal: a CPU run only smoke-tests the script
    else:
        model = random_model(QWEN25_7B)
        bw, flops = measure_bandwidth(), measure_matmul_flops()
    print(f"model built in {time.perf_counter() - t:.1f} s; device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}; "
          f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    add_lora(model, LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout))
    n_samples = b.replica_times * b.num_samples
    budget = min(b.max_new_tokens, cfg.model.max_seq_len - OPEN_BOOK)
    if "bootstrap_sampling" not in done:  # one edit's open-book candidates, base model (LoRA off)
        prompt = toks(OPEN_BOOK, rng)
        with disabled(model):
            generate(model, [prompt], max_new_tokens=16, num_samples=64, stop_ids=[], seed=1)  # compile, capture
            sec, peak, comps = timed(lambda: generate(model, [prompt], max_new_tokens=budget, temperature=b.temperature,
                                                      top_p=b.top_p, num_samples=n_samples, stop_ids=[], seed=2))
        n_tok = sum(len(c.tokens) for c in comps)
        record("bootstrap_sampling", seconds_per_edit=sec, seconds_per_case=EDITS * sec, peak_gib=peak,
               samples=n_samples, new_tokens=n_tok, tok_s=n_tok / sec, scaled=f"x{EDITS} edits")
        release(model)
    if "bootstrap_reward" not in done:  # every candidate scored: reward prompt + thought + answer line
        seqs = [toks(REWARD + budget + 12, rng) for _ in range(n_samples)]
        pos = [list(range(len(s) - 10, len(s))) for s in seqs]
        with disabled(model):
            sec, peak, _ = timed(lambda: span_mean_logprobs(model, seqs, pos))
        record("bootstrap_reward", seconds_per_edit=sec, seconds_per_case=EDITS * sec, peak_gib=peak,
               sequences=n_samples, tokens=sum(map(len, seqs)), scaled=f"x{EDITS} edits")
    # SFT: replicas x edits examples, completions to the length limit; the preset's activation checkpointing
    # ("auto": train.memory decides) first, then (GPU only, not in the total) with checkpointing forced on
    examples = [(toks(SFT_PROMPT, rng), toks(budget + 12, rng)) for _ in range(b.replica_times * EDITS)]
    for stage, ckpt in (("sft", cfg.model.grad_checkpointing), ("sft_checkpointed", True)):
        if stage in done or (stage != "sft" and (args.small or done.get("sft", {}).get("grad_checkpointing"))):
            continue  # the checkpointed row only where the preset's run was not checkpointed already
        run = lambda n: sft(model, examples, lora_parameters(model), SFTConfig(  # noqa: E731
            lr=b.learning_rate, epochs=n, batch_size=b.batch_size * b.grad_accum, stop_loss=None,
            max_length=b.sft_max_length, grad_checkpointing=ckpt))
        run(1)  # warm-up: compiles every shape
        one, _, out = timed(lambda: run(1))
        two, peak, _ = timed(lambda: run(2))
        record(stage, seconds_first_epoch=one, seconds_per_epoch=two - one,
               seconds_per_case=one + (b.epochs - 1) * (two - one), steps_per_epoch=out["steps"], peak_gib=peak,
               examples=len(examples), grad_checkpointing=out["grad_checkpointing"], graphs=out["graphs"],
               scaled=f"1 epoch + {b.epochs - 1} x (2 epochs - 1 epoch), no early stop", in_total=stage == "sft")
    if "internalize" not in done:
        steps = max_steps(EDITS, base=it.max_steps_base, per_extra_edit=it.max_steps_per_extra_edit)
        dcfg = distill_config(cfg, steps)
        prompts = [DistillPrompt(student_ids=toks(STUDENT, rng), teacher_ids=toks(TEACHER, rng), prompt_index=i)
                   for i in range(it.prompts_per_step)]
        d = Distiller(model, lora_parameters(model), dcfg, stop_ids=[])
        first, _, _ = timed(lambda: d.step(prompts, seed=0))
        sec, peak, stats = timed(lambda: [d.step(prompts, seed=s) for s in (1, 2, 3)])
        record("internalize", seconds_per_step=sec / 3, seconds_per_case=steps * sec / 3, steps=steps,
               first_step_s=first, peak_gib=peak, last_step={k: stats[-1][k] for k in
                                                            ("generate_s", "teacher_s", "student_s", "rollouts")},
               scaled=f"x{steps} steps")
        release(model)
    if "eval" not in done:  # all probes in one greedy call, to the length limit (768)
        probes = [toks(rng.randint(PROBE_MIN, PROBE_MAX), rng) for _ in range(PROBES)]
        gen = lambda n: generate(model, probes, max_new_tokens=n, temperature=0.0,  # noqa: E731
                                 repetition_penalty=cfg.eval.repetition_penalty, stop_ids=[])
        generate(model, probes[:8], max_new_tokens=16, temperature=0.0, stop_ids=[])  # compile, capture
        sec, peak, comps = timed(lambda: gen(cfg.eval.max_new_tokens))
        record("eval", seconds_per_case=sec, peak_gib=peak, probes=PROBES,
               new_tokens=sum(len(c.tokens) for c in comps), note="LoRA attached (unmerged), as the editor evaluates")
    floor = floors(model, cfg, n_samples=n_samples, budget=budget, bw=bw, flops=flops)
    print(f"{'stage':28s} {'s / case':>9s} {'floor s':>8s} {'of floor':>8s}")
    for stage, v in done.items():
        f = floor.get(stage.replace("_checkpointed", ""))
        print(f"{stage:28s} {v['seconds_per_case']:9.1f} {f:8.1f} {f / v['seconds_per_case']:8.0%}"
              + ("" if v.get("in_total", True) else "  (not in the total)"))
    total = sum(v["seconds_per_case"] for v in done.values() if v.get("in_total", True))
    print(f"total per case (4 edits): {total:.0f} s = {total / 60:.1f} min; per edit {total / EDITS:.0f} s; "
          f"floor {sum(floor.values()):.0f} s per case")


if __name__ == "__main__":
    main()
