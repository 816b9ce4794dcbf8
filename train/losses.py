"""Fused, chunked token-level losses over the lm_head: distillation KL and completion cross-entropy.

Logits are built from hidden states and the lm_head weight a chunk of tokens at a time, in fp32; the
gradient for the hidden states is computed in the same pass, so no tokens x vocab tensor ever exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.decoder import mm_fp32

DIRECTIONS = ("forward", "reverse", "jsd")
# Rows per chunk are chosen so that one model's fp32 [rows, vocab] logits take about this many bytes;
# a distillation chunk holds ~6 such buffers at its peak (measured on an H100 at V=152k: 512 MiB ->
# 768 rows, ~2.6 GiB extra; smaller chunks save memory but run the matmuls less efficiently).
CUDA_CHUNK_BYTES = 512 << 20
CPU_CHUNK_BYTES = 32 << 20


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Tokens per chunk from the byte budget above, rounded down to a multiple of 128 (matmul tiles)."""
    budget = CUDA_CHUNK_BYTES if torch.device(device).type == "cuda" else CPU_CHUNK_BYTES
    rows = budget // (4 * max(vocab_size, 1))
    return rows - rows % 128 if rows >= 128 else max(rows, 1)


class _AttachGrad(torch.autograd.Function):
    """Returns `loss` unchanged; backward hands `hidden` the gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, loss, grad_hidden):
        ctx.save_for_backward(grad_hidden)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None


def _matmul_operand(weight: torch.Tensor) -> torch.Tensor:
    # CUDA multiplies bf16/fp16 with fp32 output directly; elsewhere upcast the weight once per call.
    if weight.dtype == torch.float32 or weight.is_cuda:
        return weight
    return weight.float()


def _logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = mm_fp32(hidden, weight.t())
    return z.div_(temperature) if temperature != 1.0 else z


def _hidden_grad(grad_z: torch.Tensor, idx: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """d loss / d hidden for one chunk, given d loss / d logits on the full vocab or on columns `idx`."""
    if idx is None:
        return mm_fp32(grad_z.to(weight.dtype), weight)
    # Sparse support: sum_j g[r, j] * W[idx[r, j]] without gathering [rows, |U|, H].
    return F.embedding_bag(idx, weight, per_sample_weights=grad_z.to(weight.dtype), mode="sum")


def _union_support(zs: torch.Tensor, zt: torch.Tensor, k: int):
    """Per row, U = top-k(teacher) ∪ top-k(student) as [rows, 2k] columns; duplicates are masked out.

    Returns (idx, valid, student logits on idx, teacher logits on idx), invalid slots set to -inf so a
    log-softmax over the row renormalises on U.
    """
    it = zt.topk(k, dim=-1, sorted=False).indices
    is_ = zs.topk(k, dim=-1, sorted=False).indices
    dup = (is_.unsqueeze(-1) == it.unsqueeze(-2)).any(-1)
    idx = torch.cat([it, is_], dim=-1)
    valid = torch.cat([torch.ones_like(dup), ~dup], dim=-1)
    return (idx, valid, zs.gather(-1, idx).masked_fill_(~valid, -math.inf),
            zt.gather(-1, idx).masked_fill_(~valid, -math.inf))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as a batched dot product, without a [rows, cols] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _token_kl(zs, zt, valid, direction: str, beta: float, need_grad: bool):
    """Per-row divergence between softmax(zs) (student) and softmax(zt) (teacher), and its gradient
    with respect to zs. `valid` marks the support (None: every column). With p = student,
    q = teacher: forward d/dz = p - q; reverse d/dz = p (log p - log q - KL(p||q)); jsd
    d/dz = (1-beta) p (log p - log m - KL(p||m)), m = beta q + (1-beta) p.
    Works in place on its own buffers to keep the number of [rows, cols] tensors small."""
    ls = zs.log_softmax(-1)
    lt = zt.log_softmax(-1)
    ps = ls.exp()
    pt = lt.exp() if direction != "reverse" else None
    if valid is not None:  # outside the support p = q = 0; zero the -inf logs so 0 * log stays 0
        ls.masked_fill_(~valid, 0.0)
        lt.masked_fill_(~valid, 0.0)
    grad = None
    if direction == "forward":
        kl = _rowdot(pt, lt.sub_(ls))
        if need_grad:
            grad = ps.sub_(pt)
    elif direction == "reverse":
        d = ls.sub_(lt)
        kl = _rowdot(ps, d)
        if need_grad:
            grad = d.sub_(kl.unsqueeze(-1)).mul_(ps)
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        if valid is not None:
            lm.masked_fill_(~valid, 0.0)
        kl_t = _rowdot(pt, lt.sub_(lm))
        d = ls.sub_(lm)
        kl_s = _rowdot(ps, d)
        kl = beta * kl_t + (1.0 - beta) * kl_s
        if need_grad:
            grad = d.sub_(kl_s.unsqueeze(-1)).mul_(ps).mul_(1.0 - beta)
    return kl, grad


def _check_2d(name: str, t: torch.Tensor, hidden_size: int | None = None) -> None:
    if t.dim() != 2 or (hidden_size is not None and t.shape[1] != hidden_size):
        want = f"[N, {hidden_size}]" if hidden_size is not None else "2-D"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def distill_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    direction: str = "forward",
    top_k: int = 24,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Weighted mean token divergence: sum_i w_i D_i / max(sum_i w_i, 1e-8), an fp32 scalar.

    student_hidden, teacher_hidden [N, H] are the lm_head inputs at the same N token positions;
    lm_head_weight [V, H]; token_weights [N] >= 0 (rows with weight 0 are skipped entirely).
    Logits z = hidden @ W^T / temperature in fp32; S = softmax(z_student), T = softmax(z_teacher).

    Support: top_k = 0 uses the full vocabulary. top_k > 0 uses, per token, U = the teacher's top-k
    ∪ the student's top-k logit indices (k <= |U| <= 2k); both distributions are renormalised on U
    (log-softmax over U) and the divergence is summed over U (docs/method.md 3.6 steps 6-7).

    direction: "forward" D = KL(T || S) (teacher is the target); "reverse" D = KL(S || T);
    "jsd" the generalized Jensen-Shannon divergence with 0 < beta < 1:
        M = beta * T + (1 - beta) * S,   D = beta * KL(T || M) + (1 - beta) * KL(S || M)
    (beta = 0.5 is the ordinary JSD; it tends to 0 at either end, so the ends are refused).

    Gradient flows to student_hidden only, exactly (the top-k selection is piecewise constant and
    contributes none). The teacher is a constant target, token_weights are constants, and
    lm_head_weight gets NO gradient even if it requires one (it is frozen in LoRA training).
    The gradient is computed chunk by chunk in the forward pass and kept as one [N, H] tensor in
    student_hidden's dtype; chunk_size (tokens) defaults to default_chunk_size(V, device).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for direction='jsd', got {beta}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_2d("lm_head_weight", lm_head_weight)
    vocab, hidden_size = lm_head_weight.shape
    _check_2d("student_hidden", student_hidden, hidden_size)
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} != student_hidden shape "
                         f"{tuple(student_hidden.shape)}")
    n = student_hidden.shape[0]
    if token_weights.shape != (n,):
        raise ValueError(f"token_weights must have shape ({n},), got {tuple(token_weights.shape)}")
    w = token_weights.detach().float()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("token_weights must be finite and >= 0")
    chunk = chunk_size or default_chunk_size(vocab, student_hidden.device)
    need_grad = torch.is_grad_enabled() and student_hidden.requires_grad

    with torch.no_grad(), torch.autocast(student_hidden.device.type, enabled=False):
        scale = w / w.sum().clamp_min(1e-8)
        rows = scale.nonzero().squeeze(1)
        weight = _matmul_operand(lm_head_weight.detach())
        k = min(top_k, vocab)
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        grad = torch.zeros_like(student_hidden) if need_grad else None
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            # One matmul for both models' rows: a taller product runs closer to peak.
            z = _logits(torch.cat([student_hidden.detach()[r], teacher_hidden.detach()[r]]), weight, temperature)
            zs, zt = z[: r.numel()], z[r.numel():]
            idx = valid = None
            if k > 0:
                idx, valid, zs, zt = _union_support(zs, zt, k)
            kl, gz = _token_kl(zs, zt, valid, direction, beta, need_grad)
            del z, zs, zt
            total += (kl * scale[r]).sum()
            if need_grad:  # scale the [rows, H] result, not the [rows, V] logit gradient
                gh = _hidden_grad(gz, idx, weight).float().mul_((scale[r] / temperature).unsqueeze(-1))
                grad[r] = gh.to(grad.dtype)
            del gz
    if not need_grad:
        return total
    return _AttachGrad.apply(student_hidden, total, grad)


def completion_ce_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `labels` [N] under logits hidden[N, H] @ W^T over non-ignored positions.

    Equals F.cross_entropy(hidden @ W.T, labels, ignore_index=ignore_index) (fp32 logits) without
    holding [N, V]; returns 0 (not NaN) when every label is ignored. Gradient to hidden only, exact;
    lm_head_weight gets none (frozen in LoRA training). Checks the labels on the host (a GPU sync):
    a training loop that knows its label positions calls `weighted_ce_at` instead.
    """
    _check_2d("lm_head_weight", lm_head_weight)
    vocab, hidden_size = lm_head_weight.shape
    _check_2d("hidden", hidden, hidden_size)
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) and not ignore_index")
    rows = keep.nonzero().squeeze(1)
    weight = torch.full(rows.shape, 1.0 / max(rows.numel(), 1), dtype=torch.float32, device=hidden.device)
    return weighted_ce_at(hidden, lm_head_weight, rows, labels[rows], weight, chunk_size=chunk_size)


def weighted_ce_at(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """sum_i weight[i] * CE(hidden[rows[i]] @ W^T, targets[i]), chunked over i, gradient to hidden only.

    With weight = 1/count on the completion positions this is `completion_ce_loss`. Nothing here depends
    on the values of its inputs, so a fixed-size `rows` (padded with weight-0 entries, which add nothing
    to the loss or the gradient) gives fixed shapes and no host sync: what a CUDA graph needs. Targets
    must lie in [0, V) and `rows` be distinct where weight != 0; neither is checked here (that would sync).
    """
    _check_2d("lm_head_weight", lm_head_weight)
    _check_2d("hidden", hidden, lm_head_weight.shape[1])
    if rows.dim() != 1 or targets.shape != rows.shape or weight.shape != rows.shape:
        raise ValueError(f"rows, targets, weight must be 1-D of one length, got {tuple(rows.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(weight.shape)}")
    chunk = chunk_size or default_chunk_size(lm_head_weight.shape[0], hidden.device)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        W = _matmul_operand(lm_head_weight.detach())
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if need_grad else None
        for start in range(0, rows.numel(), chunk):
            r, y = rows[start:start + chunk], targets[start:start + chunk].unsqueeze(-1)
            w = weight[start:start + chunk].float().unsqueeze(-1)
            logp = _logits(hidden.detach()[r], W, 1.0).log_softmax(-1)
            total -= (logp.gather(-1, y) * w).sum()
            if need_grad:
                g = logp.exp_().scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=logp.dtype)).mul_(w)
                grad.index_add_(0, r, mm_fp32(g.to(W.dtype), W).to(grad.dtype))
            del logp
    if not need_grad:
        return total
    return _AttachGrad.apply(hidden, total, grad)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """fp32 log softmax(hidden @ W^T / temperature)[token_ids] per row, [N], without holding [N, V]."""
    _check_2d("lm_head_weight", lm_head_weight)
    vocab, hidden_size = lm_head_weight.shape
    _check_2d("hidden", hidden, hidden_size)
    if token_ids.shape != (hidden.shape[0],):
        raise ValueError(f"token_ids must have shape ({hidden.shape[0]},), got {tuple(token_ids.shape)}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab})")
    chunk = chunk_size or default_chunk_size(vocab, hidden.device)
    weight = _matmul_operand(lm_head_weight)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            z = _logits(hidden[s:s + chunk], weight, temperature)
            out[s:s + chunk] = z.gather(-1, token_ids[s:s + chunk].unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)
    return out
