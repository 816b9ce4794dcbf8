"""One on-policy distillation step (causal internalization, docs/method.md 3.5-3.6).

The student (LoRA on, dropout off) samples rollouts for closed-book prompts; the teacher (the same
network with LoRA off, or a teacher adapter) scores them with the open-book prompt; the student is
pulled toward the teacher's next-token distributions on its own rollouts by the fused top-k KL.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.generate import Completion, generate
from model.lora import disabled, lora_modules
from train import TrainingDiverged
from train.memory import check_setting, checkpointing
from train.schedules import SCHEDULES, lr_factor
from train.sft import pack
from train.losses import DIRECTIONS, distill_loss, token_logprobs


@dataclass
class DistillConfig:
    lr: float
    max_steps: int
    warmup_steps: int
    max_grad_norm: float = 0.5
    rollouts_per_prompt: int = 9
    micro_batches: int = 2  # gradient accumulation; the result equals one big batch
    max_completion_length: int = 180
    temperature: float = 1.0  # rollout sampling
    top_p: float = 0.9
    top_k: int = 0
    direction: str = "forward"  # "forward" KL(teacher||student) | "reverse" | "jsd"
    top_k_support: int = 24  # KL on the union of each model's top-k per token; 0 = full vocabulary
    kd_temperature: float = 1.0  # both models' logits are divided by this (KL and sequence scores)
    beta: float = 0.5  # for "jsd"
    repetition_ngram_n: int = 3
    repetition_window: int = 48
    repetition_threshold: float = 0.15  # a rollout whose repeated-n-gram ratio exceeds this gets weight 0
    seq_weight_temperature: float = 1.0
    grad_checkpointing: bool | str = False  # or "auto", per micro-batch (train.memory)
    seed: int = 3407  # rollout seed of step k is seed + k unless step() is given one
    repetition_penalty: float = 1.0  # rollout sampling (the reference leaves it at 1.0)
    mask_truncated_completions: bool = False  # weight 0 for rollouts cut at max_completion_length
    lr_scheduler: str = "constant_with_warmup"  # train.schedules.SCHEDULES, over max_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class DistillPrompt:
    student_ids: list[int]  # closed-book prompt (the rollouts are sampled from it)
    teacher_ids: list[int]  # open-book prompt (the teacher reads the same completion after it)
    prompt_index: int  # the prompt's row in the caller's pool (reported back; rollouts are grouped per entry)


def repetition_ratio(tokens: Sequence[int], n: int = 3, window: int = 48) -> float:
    """1 - (#distinct n-grams / #n-grams) over the last `window` tokens (at least n are looked at);
    0 when there are fewer than n tokens."""
    tail = list(tokens)[-max(window, n):]
    grams = [tuple(tail[i:i + n]) for i in range(len(tail) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sequence_weights(scores: torch.Tensor, groups: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
    """Softmax of scores / temperature within each group (rows with the same group id, wherever they
    sit in the batch). Every group's weights sum to 1."""
    if scores.dim() != 1 or len(groups) != scores.shape[0]:
        raise ValueError(f"sequence_weights: scores must be [R] with one group id per row, got "
                         f"{tuple(scores.shape)} and {len(groups)} ids")
    if not temperature > 0:
        raise ValueError(f"sequence_weights: temperature must be > 0, got {temperature}")
    g = torch.as_tensor(list(groups), device=scores.device)
    out = torch.empty_like(scores, dtype=torch.float32)
    for key in g.unique().tolist():
        rows = (g == key).nonzero().squeeze(1)
        out[rows] = (scores[rows].float() / temperature).softmax(0)
    return out


def _check_config(cfg: DistillConfig) -> None:
    if cfg.direction not in DIRECTIONS:
        raise ValueError(f"DistillConfig.direction must be one of {DIRECTIONS}, got {cfg.direction!r}")
    for name in ("rollouts_per_prompt", "micro_batches", "max_completion_length", "repetition_ngram_n", "max_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "max_grad_norm", "kd_temperature", "seq_weight_temperature"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"DistillConfig.{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.warmup_steps < 0 or cfg.top_k_support < 0 or cfg.top_k < 0:
        raise ValueError("DistillConfig: warmup_steps, top_k_support and top_k must be >= 0")
    if cfg.lr_scheduler not in SCHEDULES:
        raise ValueError(f"DistillConfig.lr_scheduler must be one of {SCHEDULES}, got {cfg.lr_scheduler!r}")
    check_setting(cfg.grad_checkpointing, "DistillConfig.grad_checkpointing")


class _NoDropout(contextlib.AbstractContextManager):
    """LoRA dropout 0 inside the block (the stage trains with dropout off), restored after."""

    def __init__(self, model: nn.Module):
        self.mods = [m for _, m in lora_modules(model)]

    def __enter__(self):
        self.saved = [m.dropout for m in self.mods]
        for m in self.mods:
            m.dropout = 0.0

    def __exit__(self, *exc):
        for m, p in zip(self.mods, self.saved):
            m.dropout = p


@dataclass
class _Rows:
    """One micro-batch: right-padded [prompt ; completion[:-1]] for each model and where the
    completion tokens are predicted (flat indices into [rows * T])."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor
    targets: torch.Tensor  # completion tokens, concatenated over rows
    row_of_token: torch.Tensor  # which rollout (global index) each target belongs to
    sampler_logprobs: torch.Tensor  # the sampler's log-probs of the targets (raw, T=1)


def _pack_on(seqs: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """train.sft.pack's right-padded ids (padding after the real tokens, hidden by the causal mask) and flat
    positions predicting each completion token, on `device`."""
    b = pack(seqs)
    return b.ids.to(device), b.rows.to(device)


class Distiller:
    """Holds the optimizer and the step counter of one distillation run; `step()` is one update."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: DistillConfig, stop_ids: list[int], *,
                 teacher: Callable[[], contextlib.AbstractContextManager] | None = None):
        """teacher: a factory of context managers inside which the model IS the teacher. None = the base
        model, LoRA disabled (docs/method.md 3.4 default S=1, T=0); for S=T pass e.g.
        `lambda: lora.swapped(model, teacher_snapshot)`."""
        _check_config(cfg)
        if not params or not all(p.requires_grad for p in params):
            raise ValueError("Distiller: params must be a non-empty list of parameters that require grad")
        self.model, self.params, self.cfg = model, list(params), cfg
        self.stop_ids = list(stop_ids)
        self.teacher = teacher or (lambda: disabled(model))
        self.device = model.lm_head.weight.device
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        if self.device.type == "cuda" and cfg.grad_checkpointing is not True:
            model.compile_blocks()  # teacher and student forwards (small models are launch-bound in eager)
        self.steps_done = 0
        self.last_rollouts: list[Completion] = []  # the previous step's rollouts (for logging)

    @property
    def finished(self) -> bool:
        """cfg.max_steps steps taken (the caller loops `while not d.finished`)."""
        return self.steps_done >= self.cfg.max_steps

    # -- pieces ---------------------------------------------------------------------------------

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _check_prompts(self, prompts: list[DistillPrompt]) -> None:
        if not prompts:
            raise ValueError("Distiller.step: no prompts")
        vocab = self.model.config.vocab_size
        for p in prompts:
            for name in ("student_ids", "teacher_ids"):
                ids = getattr(p, name)
                if not ids:
                    raise ValueError(f"Distiller.step: prompt {p.prompt_index} has empty {name}")
                if min(ids) < 0 or max(ids) >= vocab:
                    raise ValueError(f"Distiller.step: prompt {p.prompt_index} {name} has ids outside [0, {vocab})")

    def _micro_batches(self, prompts: list[DistillPrompt], rollouts: list[Completion]) -> list[_Rows]:
        # Longest first, then equal row counts: any split gives the same result (global normaliser).
        order = sorted(range(len(rollouts)),
                       key=lambda r: -(len(prompts[rollouts[r].prompt_index].student_ids) + len(rollouts[r].tokens)))
        n_mb = min(self.cfg.micro_batches, len(order))
        size = -(-len(order) // n_mb)
        out = []
        for m0 in range(0, len(order), size):
            rows = order[m0:m0 + size]
            comps = [rollouts[r].tokens for r in rows]
            s_ids, s_pos = _pack_on([(prompts[rollouts[r].prompt_index].student_ids, c) for r, c in zip(rows, comps)],
                                 self.device)
            t_ids, t_pos = _pack_on([(prompts[rollouts[r].prompt_index].teacher_ids, c) for r, c in zip(rows, comps)],
                                 self.device)
            targets = torch.tensor([t for c in comps for t in c], device=self.device)
            row_of = torch.tensor([r for r, c in zip(rows, comps) for _ in c], device=self.device)
            lp = torch.tensor([x for r in rows for x in rollouts[r].logprobs], device=self.device)
            out.append(_Rows(s_ids, t_ids, s_pos, t_pos, targets, row_of, lp))
        return out

    @staticmethod
    def _gather(hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)

    # -- the step -------------------------------------------------------------------------------

    def compute_gradients(self, prompts: list[DistillPrompt], *, seed: int | None = None) -> dict:
        """Sample, score and backpropagate one step's loss into the params' .grad (no optimizer step).
        Returns the statistics that `step` reports (without lr / grad_norm). seed: the rollouts'
        sampling seed; None = cfg.seed + steps taken."""
        cfg, model = self.cfg, self.model
        seed = cfg.seed + self.steps_done if seed is None else seed
        self._check_prompts(prompts)
        was_training, ckpt_before = model.training, model.gradient_checkpointing
        t0 = self._sync()
        with _NoDropout(model):
            try:
                # 1) rollouts from the student, as it is now (generate runs in eval mode)
                rollouts, lengths, groups, keep, mbs = self._rollouts(prompts, seed)
                t1 = self._sync()
                # 2) the teacher over every micro-batch first, then the rollouts' weights
                teacher_h, score_sum = self._teacher_pass(mbs, len(rollouts))
                seq_w = sequence_weights(score_sum / lengths, groups, cfg.seq_weight_temperature)
                row_w = seq_w * keep  # softmax over all of a prompt's rollouts, then the keep flag (reference)
                total_w = float((row_w * lengths).sum())  # sum over tokens of W = m * k * w
                t2 = self._sync()
                # 3) the student forward and backward per micro-batch
                loss_sum, kl_sum, kept_tokens, max_diff = self._student_pass(mbs, teacher_h, row_w, keep,
                                                                             max(total_w, 1e-8))
                t3 = self._sync()
            finally:
                model.gradient_checkpointing = ckpt_before
                model.train(was_training)
        R = len(rollouts)
        return {"loss": loss_sum, "kl_per_token": kl_sum / kept_tokens if kept_tokens else 0.0,
                "kept_fraction": float(keep.mean()), "weight_sum": total_w, "completion_length": float(lengths.mean()),
                "stopped_fraction": sum(c.finish_reason == "stop" for c in rollouts) / R, "max_logprob_diff": max_diff,
                "rollouts": R, "generate_s": t1 - t0, "teacher_s": t2 - t1, "student_s": t3 - t2}

    def _rollouts(self, prompts: list[DistillPrompt], seed: int) -> tuple:
        """(rollouts, their lengths, their group ids, their keep flags, the micro-batches)."""
        cfg = self.cfg
        rollouts = generate(self.model, [p.student_ids for p in prompts], max_new_tokens=cfg.max_completion_length,
                            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            repetition_penalty=cfg.repetition_penalty, num_samples=cfg.rollouts_per_prompt,
                            stop_ids=self.stop_ids, seed=seed)
        self.last_rollouts = rollouts
        # Every rollout has >= 1 token (max_completion_length >= 1); its tokens are exactly the completion
        # mask's valid tokens: generation ends at the first stop token, included.
        lengths = torch.tensor([len(c.tokens) for c in rollouts], dtype=torch.float32, device=self.device)
        # Groups: the rollouts of each entry of `prompts`, by the id generate() gives them (an entry drawn
        # twice is two groups of rollouts_per_prompt, as in the reference's sampler).
        groups = [c.prompt_index for c in rollouts]
        keep = torch.tensor([float(repetition_ratio(c.tokens, cfg.repetition_ngram_n, cfg.repetition_window)
                                   <= cfg.repetition_threshold) for c in rollouts], device=self.device)
        if cfg.mask_truncated_completions:
            keep *= torch.tensor([float(c.finish_reason == "stop") for c in rollouts], device=self.device)
        return rollouts, lengths, groups, keep, self._micro_batches(prompts, rollouts)

    def _teacher_pass(self, mbs: list[_Rows], n_rollouts: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's hidden states at the completion rows, and each rollout's summed log-prob under it
        at kd_temperature (the reference divides the logits by it before everything else). All teacher
        forwards come first: the teacher context may swap weights, which must not happen under a pending
        student backward."""
        model, W = self.model, self.model.lm_head.weight
        model.eval()
        teacher_h, score_sum = [], torch.zeros(n_rollouts, device=self.device)
        with torch.no_grad(), self.teacher():
            for mb in mbs:
                h = self._gather(model.hidden(mb.teacher_ids), mb.teacher_pos)
                teacher_h.append(h)
                lp = token_logprobs(h, W, mb.targets, temperature=self.cfg.kd_temperature)
                score_sum.index_add_(0, mb.row_of_token, lp)
        return teacher_h, score_sum

    def _student_pass(self, mbs: list[_Rows], teacher_h: list[torch.Tensor], row_w: torch.Tensor,
                      keep: torch.Tensor, norm: float) -> tuple[float, float, float, float]:
        """Forward and backward of the student per micro-batch, each scaled to the global normaliser;
        returns (loss, summed unweighted KL of kept tokens, kept tokens, largest sampler/trainer log-prob gap)."""
        cfg, model, W = self.cfg, self.model, self.model.lm_head.weight
        model.train()
        loss_sum, kl_sum, kept_tokens, max_diff = 0.0, 0.0, 0.0, 0.0
        for mb, th in zip(mbs, teacher_h):
            model.gradient_checkpointing = checkpointing(cfg.grad_checkpointing, model, mb.student_ids.numel())
            sh = self._gather(model.hidden(mb.student_ids), mb.student_pos)
            w_tok = row_w[mb.row_of_token]
            w_mb = float(w_tok.sum())
            loss = distill_loss(sh, th, W, w_tok, direction=cfg.direction, top_k=cfg.top_k_support,
                                temperature=cfg.kd_temperature, beta=cfg.beta)
            (loss * (w_mb / norm)).backward()
            loss_sum += float(loss.detach()) * w_mb / norm
            with torch.no_grad():
                sd = sh.detach()
                k_tok = keep[mb.row_of_token]  # the unweighted KL per kept token, for the log
                n_k = float(k_tok.sum())
                if n_k > 0:
                    kl = distill_loss(sd, th, W, k_tok, direction=cfg.direction, top_k=cfg.top_k_support,
                                      temperature=cfg.kd_temperature, beta=cfg.beta)
                    kl_sum += float(kl) * n_k
                    kept_tokens += n_k
                # no importance-sampling factor: sampler and trainer are one network, so check it
                mine = token_logprobs(sd, W, mb.targets)
                max_diff = max(max_diff, float((mine - mb.sampler_logprobs).abs().max()))
            del sh, loss
        return loss_sum, kl_sum, kept_tokens, max_diff

    def step(self, prompts: list[DistillPrompt], *, seed: int | None = None) -> dict:
        """One optimizer step: rollouts, teacher and student forwards, weighted KL, clip, AdamW."""
        t0 = self._sync()
        lr = self.cfg.lr * lr_factor(self.cfg.lr_scheduler, self.steps_done, self.cfg.max_steps, self.cfg.warmup_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        stats = self.compute_gradients(prompts, seed=seed)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        loss = stats.get("loss")
        if not math.isfinite(gnorm) or (isinstance(loss, float) and not math.isfinite(loss)):
            self.opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"distillation step {self.steps_done + 1}: loss {loss}, gradient norm {gnorm} "
                                   f"(learning rate {lr:g}); the training diverged: lower the learning rate")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        stats.update(step=self.steps_done, lr=lr, grad_norm=gnorm, seconds=self._sync() - t0)
        return stats
