"""Decode attention in Triton with an online softmax in fp32, so no score tensor is written to memory:
a tile of rows reads the shared prefix once (their query heads stacked into one matmul), then each
(row, KV head) program streams its own cache slots, continuing from the prefix's partial state.

Used by `decoder.attend` for single-token steps on CUDA; the torch form (`decoder._attend_decode`) is the
reference it is tested against (tests/test_decode_attention.py runs it in Triton's interpreter on CPU).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # GPU builds of torch ship Triton; CPU builds need none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tile sizes, from a sweep on an H200 (bench/runs/p9/own_kernel_sweep_s12.log, 7B and SmolLM2 heads):
PREFIX_SLOTS = 128  # prefix slots per inner step (a block no line of the tile sees is skipped, never read)
PREFIX_LINES = 64  # query lines (rows x query heads per KV head) that share one read of the prefix
OWN_SLOTS = 64  # own-cache slots per inner step
OWN_STAGES = 3  # software-pipelined loads of the own loop (next blocks in flight while one is folded)


def usable(qg: Tensor) -> bool:
    """Whether the kernel serves these queries (head_dim last): Triton present, a power-of-two head_dim of
    16 or more (tl.dot's smallest tile), and a device Triton runs on (CUDA, or CPU under TRITON_INTERPRET)."""
    D = qg.shape[-1]
    return triton is not None and D >= 16 and D & (D - 1) == 0 and (qg.is_cuda or _interpreted())


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    @triton.jit
    def _fold(q, k, v, vis, m, den, acc, scale, IEEE: tl.constexpr):
        """Fold one block of keys k / values v [BN, D] into the running max m, denominator den and
        unnormalised output acc of the query lines q [M, D]; vis [M, BN] (or [1, BN]): which slots each
        line may see. A line that has seen nothing keeps m = -inf and adds 0."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(vis, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp(-inf - 0) = 0, not exp(nan)
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, den * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv

    @triton.jit
    def _prefix_kernel(Q, PK, PV, Mask, Acc, Mx, Den, sq_b, sq_h, sq_g, spk_h, spk_s, spv_h, spv_s, sm_b,
                       B, L, G, R, scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):
        """One KV head's shared prefix for a tile of R consecutive rows (R * G query lines in one dot, so
        the tile reads the prefix once): the partial softmax state of every line, to Acc/Mx/Den."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        i = tl.arange(0, BM)
        d = tl.arange(0, D)
        r = t * R + i // G
        hg = i % G
        line = (i < R * G) & (r < B)
        q = tl.load(Q + r[:, None] * sq_b + h * sq_h + hg[:, None] * sq_g + d[None, :], mask=line[:, None], other=0.0)
        m = tl.full([BM], float("-inf"), tl.float32)
        den = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for start in range(0, L, BN):
            n = start + tl.arange(0, BN)
            vis = tl.load(Mask + r[:, None] * sm_b + n[None, :], mask=line[:, None] & (n < L)[None, :], other=0) != 0
            seen = tl.max(vis.to(tl.int32), axis=0) > 0  # [BN]: slots some line of the tile sees
            if tl.max(seen.to(tl.int32), axis=0) > 0:
                k = tl.load(PK + h * spk_h + n[:, None] * spk_s + d[None, :], mask=seen[:, None], other=0.0)
                v = tl.load(PV + h * spv_h + n[:, None] * spv_s + d[None, :], mask=seen[:, None], other=0.0)
                m, den, acc = _fold(q, k, v, vis, m, den, acc, scale, IEEE)
        o = (r * tl.num_programs(1) + h) * G + hg  # [B, kv, G] flattened
        tl.store(Acc + o[:, None] * D + d[None, :], acc, mask=line[:, None])
        tl.store(Mx + o, m, mask=line)
        tl.store(Den + o, den, mask=line)

    @triton.jit
    def _own_kernel(Q, K, V, Mask, Acc, Mx, Den, O,
                    sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, so_b, so_h, so_g,
                    S, L, G, scale, D: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
                    HAS_PREFIX: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr):
        """One row's own slots for one KV head, continuing from the prefix's partial state (if any), then
        the normalised output."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        gi = tl.arange(0, GP)
        d = tl.arange(0, D)
        head = gi < G
        q = tl.load(Q + b * sq_b + h * sq_h + gi[:, None] * sq_g + d[None, :], mask=head[:, None], other=0.0)
        o = (b * tl.num_programs(1) + h) * G + gi
        if HAS_PREFIX:
            m = tl.load(Mx + o, mask=head, other=float("-inf"))
            den = tl.load(Den + o, mask=head, other=0.0)
            acc = tl.load(Acc + o[:, None] * D + d[None, :], mask=head[:, None], other=0.0)
        else:
            m = tl.full([GP], float("-inf"), tl.float32)
            den = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
        Kp, Vp, Mp = K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, Mask + b * sm_b + L
        # No skip branch here (a row's own slots are nearly all visible): the loop then pipelines its loads.
        # Masked slots are still never read, and a masked block folds in exactly nothing (p = 0, alpha = 1).
        for start in tl.range(0, S, BN, num_stages=STAGES):
            n = start + tl.arange(0, BN)
            vis = tl.load(Mp + n, mask=n < S, other=0) != 0
            k = tl.load(Kp + n[:, None] * sk_s + d[None, :], mask=vis[:, None], other=0.0)
            v = tl.load(Vp + n[:, None] * sv_s + d[None, :], mask=vis[:, None], other=0.0)
            m, den, acc = _fold(q, k, v, vis[None, :], m, den, acc, scale, IEEE)
        tl.store(O + b * so_b + h * so_h + gi[:, None] * so_g + d[None, :], (acc / den[:, None]).to(O.dtype.element_ty),
                 mask=head[:, None])


def decode_attention(qg: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: tuple[Tensor, Tensor] | None = None,
                     new: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Attention of one new token per row: qg [B, kv, g, D]; own cache k, v [B, kv, >= S, D], of which the
    first S slots are attended; mask bool [B, 1, 1, L + S] over [prefix | own slots]; prefix (keys, values
    [kv, L, D]) shared by all rows. `new` = (keys, values [B, kv, 1, D], slot index [1]) is first written
    into the cache, inside the op: a compiled step then hands the op the cache buffers themselves (written
    outside, inductor copies the whole window every step whenever it is a view of a larger buffer).
    Returns [B, kv, g, D] in v's dtype. Every row must see at least one slot."""
    pk, pv = prefix if prefix is not None else (None, None)
    kn, vn, idx = new if new is not None else (None, None, None)
    return _decode_op(qg, k, v, mask.reshape(mask.shape[0], mask.shape[-1]), pk, pv, kn, vn, idx)


if triton is not None:
    # A custom op, so torch.compile keeps the block one graph around it (a graph break would split it).
    @torch.library.custom_op("code_edit::decode_attention", mutates_args=("k", "v"))
    def _decode_op(qg: Tensor, k: Tensor, v: Tensor, mask: Tensor, pk: Tensor | None, pv: Tensor | None,
                   kn: Tensor | None, vn: Tensor | None, idx: Tensor | None) -> Tensor:
        if kn is not None:
            k.index_copy_(2, idx, kn)
            v.index_copy_(2, idx, vn)
        qg, k, v, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (qg, k, v, mask))
        B, kv, g, D = qg.shape
        L = pk.shape[1] if pk is not None else 0
        S, scale, ieee = mask.shape[1] - L, 1.0 / math.sqrt(D), v.dtype == torch.float32
        if not 0 < S <= k.shape[2]:
            raise ValueError(f"decode_attention: mask covers {S} own slots, cache k holds {k.shape[2]}")
        mask = mask.view(torch.uint8)
        state = [v] * 3  # unread without a prefix
        if L:  # 1) the shared prefix, a tile of rows at a time: partial output, max, denominator per line
            state = [torch.empty(B, kv, g, *d, dtype=torch.float32, device=v.device) for d in ((D,), (), ())]
            pk, pv = (t if t.stride(-1) == 1 else t.contiguous() for t in (pk, pv))
            R = max(1, PREFIX_LINES // g)
            _prefix_kernel[(triton.cdiv(B, R), kv)](
                qg, pk, pv, mask, *state, qg.stride(0), qg.stride(1), qg.stride(2),
                pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1), mask.stride(0),
                B, L, g, R, scale, D=D, BM=triton.next_power_of_2(R * g), BN=PREFIX_SLOTS, IEEE=ieee, num_warps=4)
        out = torch.empty(B, kv, g, D, dtype=v.dtype, device=v.device)
        _own_kernel[(B, kv)](  # 2) each row's own slots, from the prefix's state
            qg, k, v, mask, *state, out, qg.stride(0), qg.stride(1), qg.stride(2),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
            out.stride(0), out.stride(1), out.stride(2), S, L, g, scale,
            D=D, GP=max(16, triton.next_power_of_2(g)), BN=OWN_SLOTS, HAS_PREFIX=L > 0, IEEE=ieee,
            STAGES=OWN_STAGES, num_warps=4)
        return out

    @_decode_op.register_fake
    def _(qg, k, v, mask, pk, pv, kn, vn, idx):
        return qg.new_empty(qg.shape, dtype=v.dtype)
