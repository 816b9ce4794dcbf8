"""Supervised LoRA fine-tuning with a completion-only loss (causal bootstrapping's SFT, docs/method.md 3.2 step 9).

AdamW over the given parameters, linear warmup then cfg.lr_scheduler over the planned steps, gradient
clipping, per-epoch shuffling, early stop once the step loss stays below a threshold. A batch's rows are
packed end to end with per-row causal attention, so padding costs nothing. The host reads each step's
loss one step late, so it never waits for the GPU to drain (see `sft`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.cuda_graph import GraphedStep
from model.decoder import Segments
from train import TrainingDiverged
from train.memory import check_setting, checkpointing
from train.schedules import lr_factor
from train.losses import weighted_ce_at

log_ = logging.getLogger(__name__)  # `log` is sft's per-step callback argument
PACK_STEP = 1024  # a graphed step's packed length is a multiple of this: each shape costs one graph capture


@dataclass
class SFTConfig:
    lr: float
    epochs: int
    batch_size: int
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # train.schedules.SCHEDULES
    stop_loss: float | None = 0.35  # early stop when the step loss is below this ...
    stop_consecutive: int = 2  # ... on this many consecutive steps; None disables it
    max_length: int = 1024  # prompt + completion tokens per example (see truncate_example)
    grad_checkpointing: bool | str = False  # or "auto": on only where the step would not fit (train.memory)
    seed: int = 3407  # data order and LoRA dropout masks
    cuda_graphs: bool = True  # replay each step as one CUDA graph (see use_cuda_graphs, GraphedStep)


def sft_plan(num_examples: int, batch_size: int, epochs: int, warmup_ratio: float) -> tuple[int, int]:
    """(total optimizer steps, warmup steps): ceil(n / batch) * epochs and ceil(ratio * total)."""
    total = math.ceil(num_examples / batch_size) * epochs
    return total, math.ceil(warmup_ratio * total)


def truncate_example(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into max_length tokens. The completion is what is learned, so it is kept
    whole and the prompt loses its beginning (its end, next to the answer, matters most). A completion
    that cannot fit beside one prompt token keeps its first max_length - 1 tokens (the end-of-turn
    token is then lost, as with a keep-start truncation)."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    if len(completion) <= max_length - 1:
        return prompt[len(prompt) + len(completion) - max_length:], completion
    return prompt[-1:], completion[: max_length - 1]


@dataclass
class Batch:
    """Right-padded rows (the distillation step's layout): ids [B, T] of prompt + completion without its
    last token, padded with pad_id; rows: flat positions (b * T + t) whose next token is learned, in
    row-major order; targets: those tokens; weight: 1 / (completion tokens in the batch)."""
    ids: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    tokens: int


def pack(rows: list[tuple[list[int], list[int]]], pad_id: int = 0) -> Batch:
    """The right-padded Batch of (prompt, completion) rows, as small as the rows allow."""
    seqs = [(p + c)[:-1] for p, c in rows]
    n_learn, T = sum(len(c) for _, c in rows), max(len(q) for q in seqs)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos, tgt = [], []
    for b, ((p, c), q) in enumerate(zip(rows, seqs)):
        ids[b, : len(q)] = torch.tensor(q)
        pos.extend(range(b * T + len(p) - 1, b * T + len(p) - 1 + len(c)))
        tgt.extend(c)
    return Batch(ids, torch.tensor(pos, dtype=torch.long), torch.tensor(tgt, dtype=torch.long),
                 torch.full((n_learn,), 1.0 / n_learn), n_learn)


@dataclass
class Packed:
    """One SFT step's inputs on the host, the batch's rows (prompt + completion without its last token) laid
    end to end in one row: ids and positions [1, T] (positions restart at 0 in each row); starts, int32
    [B + 2], the rows' boundaries, the last segment being the padding tail (a fixed shape's missing rows
    are empty segments); rows: flat positions whose next token is learned; targets: those tokens; weight:
    1 / (completion tokens in the batch), 0 on padding entries (which point at position 0)."""
    ids: torch.Tensor
    positions: torch.Tensor
    starts: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    tokens: int
    real: int  # positions holding a real token (the rest is padding)

    def to(self, device) -> tuple[torch.Tensor, ...]:
        ts = (self.ids, self.positions, self.starts, self.rows, self.targets, self.weight)
        if torch.device(device).type == "cuda":  # pinned: the copies queue behind the GPU's work, the host goes on
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in ts)
        return tuple(t.to(device) for t in ts)


def pack_stream(rows: list[tuple[list[int], list[int]]], shape: tuple[int, int, int] | None = None,
                pad_id: int = 0) -> Packed:
    """The Packed batch of (prompt, completion) rows; shape = (B, T, R) pads it to B rows, T positions and
    R learned positions (for a CUDA graph), else it is as small as the rows allow."""
    seqs = [(p + c)[:-1] for p, c in rows]
    n_learn, real = sum(len(c) for _, c in rows), sum(len(q) for q in seqs)
    B, T, R = shape or (len(rows), real, n_learn)
    if len(rows) > B or real > T or n_learn > R:
        raise ValueError(f"pack_stream: {len(rows)} rows, {real} positions, {n_learn} learned "
                         f"tokens do not fit the fixed shape {(B, T, R)}")
    ids = torch.full((1, T), pad_id, dtype=torch.long)
    positions = torch.zeros((1, T), dtype=torch.long)
    starts, pos, tgt, at = [0], [], [], 0
    for (p, c), q in zip(rows, seqs):
        ids[0, at:at + len(q)] = torch.tensor(q)
        positions[0, at:at + len(q)] = torch.arange(len(q))
        pos.extend(range(at + len(p) - 1, at + len(p) - 1 + len(c)))
        tgt.extend(c)
        at += len(q)
        starts.append(at)
    starts += [at] * (B - len(rows)) + [T]
    pad = R - n_learn
    weight = torch.zeros(R, dtype=torch.float32)
    weight[:n_learn] = 1.0 / n_learn
    return Packed(ids, positions, torch.tensor(starts, dtype=torch.int32),
                  torch.tensor(pos + [0] * pad, dtype=torch.long), torch.tensor(tgt + [0] * pad, dtype=torch.long),
                  weight, n_learn, real)


def use_cuda_graphs(device: torch.device, cfg: "SFTConfig", ckpt: bool) -> bool:
    """Graph replay for the step: on CUDA, without activation checkpointing (large models, whose steps are
    long kernels anyway), unless CODE_EDIT_CUDA_GRAPHS=0."""
    return (device.type == "cuda" and cfg.cuda_graphs and not ckpt
            and os.environ.get("CODE_EDIT_CUDA_GRAPHS", "1") != "0")


class _StepStats:
    """A step's loss and gradient norm, read by the host later: on CUDA copied to pinned memory behind an
    event, so waiting for them does not wait for the work queued after them."""

    def __init__(self, loss: torch.Tensor, gnorm: torch.Tensor):
        self.event = None
        if loss.is_cuda:
            self.values = torch.stack([loss.float(), gnorm.float()]).to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = torch.stack([loss.float(), gnorm.float()])

    def read(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()
        loss, gnorm = self.values.tolist()
        return loss, gnorm


def _check(examples, params, cfg: SFTConfig, vocab: int) -> None:
    if not examples:
        raise ValueError("sft: no examples")
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.max_length < 2:
        raise ValueError(f"SFTConfig: batch_size, epochs must be >= 1 and max_length >= 2, got "
                         f"{cfg.batch_size}, {cfg.epochs}, {cfg.max_length}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0 or cfg.lr <= 0 or cfg.max_grad_norm <= 0:
        raise ValueError(f"SFTConfig: need 0 <= warmup_ratio <= 1, lr > 0, max_grad_norm > 0, got "
                         f"{cfg.warmup_ratio}, {cfg.lr}, {cfg.max_grad_norm}")
    check_setting(cfg.grad_checkpointing, "SFTConfig.grad_checkpointing")
    if cfg.stop_loss is not None and cfg.stop_consecutive < 1:
        raise ValueError(f"SFTConfig.stop_consecutive must be >= 1, got {cfg.stop_consecutive}")
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("sft: params must be a non-empty list of parameters that require grad")
    for i, (p, c) in enumerate(examples):
        if not p or not c:
            raise ValueError(f"sft: examples[{i}] has an empty {'prompt' if not p else 'completion'}")
        bad = [t for t in (*p, *c) if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"sft: examples[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab})")


def sft(model: nn.Module, examples: list[tuple[list[int], list[int]]], params: list[nn.Parameter],
        cfg: SFTConfig, *, log: Callable[[dict], None] | None = None, fixed_shapes: bool | None = None) -> dict:
    """Train `params` on (prompt_ids, completion_ids) pairs; the completion carries its own end-of-turn
    token. Returns {"steps", "final_loss", "stopped_early", "losses", "total_steps", "truncated", "seconds",
    "cuda_graph" (whether any step was replayed from a graph), "graphs" (captured, one per shape; 0 after
    a capture failure), "graphed_steps", "shapes" (distinct batch shapes run), "positions" (token positions
    run, padding included), "padding" (the fraction of them that was padding), "grad_checkpointing" (whether
    activations were recomputed: cfg.grad_checkpointing, "auto" resolved by train.memory.checkpointing)}.

    Precision: the model runs in its own dtype, without autocast. On a bf16 base every matmul is bf16
    already, LoRA casts its fp32 master weights to the activation dtype itself (the rounding autocast
    would apply), RMSNorm/RoPE and the loss compute in fp32 explicitly, and the gradients land on the
    fp32 masters; autocast would add only its cast cache. An fp32 model stays fp32 (tests, CPU).

    Each batch runs packed: its rows end to end in one row, attention confined to each row (Segments), so
    no position is padding but a graphed step's tail. With CUDA graphs (use_cuda_graphs) each batch is
    padded to its bucket's shape (`_step_shapes`), one graph per bucket; padding adds nothing to the loss.
    `fixed_shapes` (default: exactly when graphs are used) runs that padding without a graph, to check it.
    """
    # 1) the data, the schedule and the batch plan
    device = model.lm_head.weight.device
    _check(examples, params, cfg, model.config.vocab_size)
    rows = [truncate_example(p, c, cfg.max_length) for p, c in examples]
    truncated = sum(len(p) + len(c) > cfg.max_length for p, c in examples)
    total, warmup = sft_plan(len(rows), cfg.batch_size, cfg.epochs, cfg.warmup_ratio)
    if device.type == "cuda":  # the sampler's kept KV cache (candidate generation) can be tens of GiB
        from model.generate import release
        release(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    plan = _batch_plan(rows, cfg)
    longest_step = max(sum(len(p) + len(c) - 1 for p, c in b) for _, b in plan)
    ckpt = checkpointing(cfg.grad_checkpointing, model, longest_step + (-longest_step) % PACK_STEP)
    graphs = use_cuda_graphs(device, cfg, ckpt)
    shapes = _step_shapes(plan) if (graphs if fixed_shapes is None else fixed_shapes) else None
    # 2) the model in training mode
    t0 = time.perf_counter()
    ckpt_before = model.gradient_checkpointing
    model.gradient_checkpointing = ckpt
    if device.type == "cuda":  # small models are launch-bound in eager mode (BENCHMARKS "SmolLM2")
        model.compile_blocks()
    model.train()
    W = model.lm_head.weight

    longest = max(cfg.max_length, PACK_STEP)  # bounds every segment, the padding tail's too

    def step_fn(ids, positions, starts, rows, targets, weight):
        """Forward, backward and clipping of one packed batch; no host sync, so it can be captured."""
        h = model.run(ids, positions, Segments(starts, longest))
        loss = weighted_ce_at(h[0], W, rows, targets, weight)
        loss.backward()
        return loss.detach(), torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=device.type == "cuda")

    # 3) the steps. Dropout masks come from the global RNG: fork it so a seed gives one run and the
    #    caller's state stays.
    record = _Recorder(cfg, log)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        run = _GraphPerShape(step_fn, params) if graphs else step_fn
        try:
            stopped = _run_steps(run, plan, shapes, device, opt, cfg, total, warmup, record)
        finally:
            model.gradient_checkpointing = ckpt_before
            model.eval()
            for p in params:  # frees a graph's gradient buffers with the graph
                p.grad = None
            graphs_used = (len(run.graphs), run.replays) if isinstance(run, _GraphPerShape) else (0, 0)
            del run
    return {"steps": len(record.losses), "final_loss": record.losses[-1], "stopped_early": stopped,
            "losses": record.losses, "total_steps": total, "truncated": truncated,
            "seconds": time.perf_counter() - t0, "cuda_graph": graphs_used[1] > 0, "graphs": graphs_used[0],
            "graphed_steps": graphs_used[1], "shapes": len(record.shapes), "positions": record.run_positions,
            "padding": round(record.padding(), 4), "grad_checkpointing": ckpt}


def _batch_plan(rows: list[tuple[list[int], list[int]]], cfg: SFTConfig) -> list[tuple[int, list]]:
    """(epoch, rows of the batch) for every planned step: a seeded shuffle per epoch, drawn up front."""
    gen = torch.Generator().manual_seed(cfg.seed)
    plan = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        plan += [(epoch, [rows[i] for i in order[b0:b0 + cfg.batch_size]]) for b0 in range(0, len(order), cfg.batch_size)]
    return plan


def _step_shapes(plan: list) -> list[tuple[int, int, int]]:
    """Each planned batch's padded shape (rows, packed positions, learned tokens): its rows' total length
    rounded up to PACK_STEP, and within one (rows, positions) bucket the most learned tokens of its
    batches, so a bucket is one shape (one CUDA graph) and a batch pays for little beyond its own tokens."""
    keys = []
    for _, b in plan:
        T = sum(len(p) + len(c) - 1 for p, c in b)
        keys.append((len(b), T + (-T) % PACK_STEP))
    learned: dict[tuple[int, int], int] = {}
    for k, (_, b) in zip(keys, plan):
        learned[k] = max(learned.get(k, 0), sum(len(c) for _, c in b))
    return [(B, T, learned[(B, T)]) for B, T in keys]


class _GraphPerShape:
    """The step replayed from one CUDA graph per input shape, captured on first use into one memory pool
    (steps run one after another on one stream, and each graph's outputs stay referenced, so a replay only
    reuses another graph's scratch memory, in any order). Each graph's backward writes its own gradient
    buffers: before a replay the parameters' .grad are pointed at that graph's, for the optimizer to read.
    If a kernel cannot be captured, every later step runs uncaptured."""

    def __init__(self, step_fn: Callable, params: list[nn.Parameter]):
        self.step_fn, self.params, self.graphs, self.pool, self.graphed = step_fn, params, {}, None, True
        self.replays = 0

    def __call__(self, *inputs: torch.Tensor):
        if not self.graphed:
            return self.step_fn(*inputs)
        key = tuple(t.shape for t in inputs)
        g = self.graphs.get(key)
        if g is None:
            for p in self.params:  # the warm-up must not accumulate into another graph's buffers
                p.grad = None
            try:
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                g = GraphedStep(self.step_fn, inputs, params=self.params, pool=self.pool)
            except Exception as e:  # the same steps, launched one by one
                log_.warning("sft: CUDA graph capture failed (%s: %s); running uncaptured", type(e).__name__, e)
                self.graphed, self.graphs = False, {}
                for p in self.params:
                    p.grad = None
                return self.step_fn(*inputs)
            g = self.graphs[key] = (g, [p.grad for p in self.params])
        graph, grads = g
        for p, gr in zip(self.params, grads):
            p.grad = gr
        self.replays += 1
        return graph(*inputs)


class _Recorder:
    """Finished steps: their losses and log lines, the early stop, and the divergence check."""

    def __init__(self, cfg: SFTConfig, log: Callable[[dict], None] | None):
        self.cfg, self.log, self.losses, self.below = cfg, log, [], 0
        self.run_positions, self.real_positions, self.shapes = 0, 0, set()

    def positions(self, b: Packed) -> None:
        """Count a batch's positions, run (its padded shape) and real (its rows' tokens), and its shape."""
        self.run_positions += b.ids.numel()
        self.real_positions += b.real
        self.shapes.add((*b.ids.shape, b.rows.numel()))

    def padding(self) -> float:
        return 1.0 - self.real_positions / self.run_positions if self.run_positions else 0.0

    def __call__(self, pending: tuple) -> bool:
        """Record one step; whether it stops the run."""
        step, epoch, lr, n_tokens, stats = pending
        value, gnorm = stats.read()
        if not (math.isfinite(value) and math.isfinite(gnorm)):
            raise TrainingDiverged(f"SFT step {step}: loss {value}, gradient norm {gnorm} (learning rate {lr:g}); "
                                   "the training diverged: lower the learning rate")
        self.losses.append(value)
        if self.log is not None:
            self.log({"step": step, "epoch": epoch, "loss": value, "lr": lr, "grad_norm": gnorm, "tokens": n_tokens})
        stop = self.cfg.stop_loss
        self.below = self.below + 1 if stop is not None and value < stop else 0
        return stop is not None and self.below >= self.cfg.stop_consecutive


def _run_steps(run: Callable, plan: list, shapes: list | None, device: torch.device,
               opt: torch.optim.Optimizer, cfg: SFTConfig, total: int, warmup: int, record: _Recorder) -> bool:
    """Every planned step; whether the early stop ended them. Step k's loss is read after step k+1's forward
    and backward are queued, so the host never waits for an idle GPU (a 135M model's step is launch-bound).
    If step k stops the run, step k+1's gradients are dropped before its optimizer step: parameters, losses
    and logs are those of the plain loop."""
    pending = None
    for step, (epoch, batch) in enumerate(plan):
        b = pack_stream(batch, shapes[step] if shapes else None)
        record.positions(b)
        loss, gnorm = run(*b.to(device))
        if pending is not None and record(pending):
            opt.zero_grad(set_to_none=True)
            return True
        lr = cfg.lr * lr_factor(cfg.lr_scheduler, step, total, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        stats = _StepStats(loss, gnorm)
        opt.step()
        if not getattr(run, "graphed", False):  # a graph's gradients are static buffers each replay overwrites
            opt.zero_grad(set_to_none=True)
        pending = (step + 1, epoch, lr, b.tokens, stats)
    return record(pending) if pending is not None else False
