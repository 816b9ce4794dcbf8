"""Batched KV-cache sampling: the rollout engine for candidates, distillation rollouts and evaluation.

Prompts are left-padded into a static, preallocated cache; each prompt is prefilled once and its cache
copied to its `num_samples` rows, or, when few prompts are sampled many times (candidates, rollouts),
kept once as a prefix that all their rows attend to; finished rows are compacted away; on CUDA the
decode step runs as a replayed CUDA graph (optionally compiled), and nothing syncs with the host except
every `SYNC_EVERY` steps.
"""
from __future__ import annotations

import math
import operator
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoder import KVCache, Transformer, adapter_groups, padding_mask, positions_from_mask
from .cuda_graph import GraphedStep
from .lora import cast_once, lora_modules, merged_for_inference

try:  # GPU builds of torch ship Triton; CPU builds need none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SYNC_EVERY = 16  # decode steps between host checks (all done? compact?)
PREFILL_TOKENS = 16384  # padded prompt tokens per prefill chunk


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    tokens: list[int]  # includes the stop token when finish_reason == "stop"
    logprobs: list[float]  # log p(token) under the model's raw (unprocessed, T=1) distribution
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)  # part of a captured step's key
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


ATTEND_STEP = 256  # decode attends over the filled cache slots rounded up to this (one graph per window)
RACE_CANDIDATES = 16  # race winners checked against the nucleus (see `sample`)
# Shared prompts: with num_samples >= 2 and at most this many prompts, each prompt's keys/values are
# stored once (a prefix all rows attend to) instead of in every row. Each step then reads the prompt
# once, not once per row; the price is scores over every prompt's slots for every row, which stays
# smaller than the saved reads while the prompts are few (see `attend`).
SHARED_PREFIX_MAX_PROMPTS = 4
MAX_ROWS = 8192  # sequences decoded at once at most (memory permitting: a case's 4 x 1,200 candidates in one batch)


def process_logits(logits: Tensor, p: SamplingParams, seen: Tensor | None) -> Tensor:
    """transformers' processors before the nucleus: repetition penalty, temperature, top-k (fp32)."""
    if p.repetition_penalty != 1.0 and seen is not None:
        pen = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if p.temperature <= 0:
        return logits
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def nucleus_keep(probs: Tensor, cand: Tensor, top_p: float) -> Tensor:
    """Whether each candidate token [B, M] survives transformers' top-p filter: kept iff the mass of the
    tokens more likely than it is below top_p. Computed without sorting the vocabulary."""
    pc = probs.gather(1, cand)
    if probs.is_cuda:
        if triton is not None and cand.shape[1] == RACE_CANDIDATES:  # 16: tl.arange needs a power of two
            return _mass_above_triton(probs, pc) < top_p
        return mass_above(probs, pc) < top_p
    thr, order = pc.sort(dim=1)  # CPU: bucket every token between the sorted candidate probabilities
    count = torch.searchsorted(thr, probs)
    hist = torch.zeros(probs.shape[0], cand.shape[1] + 1, device=probs.device, dtype=probs.dtype)
    hist.scatter_add_(1, count, probs)
    above = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # above[m] = mass of tokens above the m-th threshold
    return torch.empty_like(above, dtype=torch.bool).scatter_(1, order, above < top_p)


def mass_above(probs: Tensor, pc: Tensor) -> Tensor:
    """[B, M]: the mass of the tokens more likely than each candidate, as M masked sums (scatter_add's
    atomics crawl on CUDA); compiled, each sum still reads the row once."""
    return torch.where(probs[:, None, :] > pc[:, :, None], probs[:, None, :], 0.0).sum(-1)


if triton is not None:
    @triton.jit
    def _mass_above_kernel(P, C, O, V, stride, M: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        m = tl.arange(0, M)
        thr = tl.load(C + row * M + m)
        acc = tl.zeros([M, BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            p = tl.load(P + row * stride + offs, mask=offs < V, other=0.0)
            acc += tl.where(p[None, :] > thr[:, None], p[None, :], 0.0)
        tl.store(O + row * M + m, tl.sum(acc, axis=1))


@torch.compiler.disable  # a graph break is cheaper than tracing a user kernel with symbolic sizes
def _mass_above_triton(probs: Tensor, pc: Tensor) -> Tensor:
    """For each row and candidate, the mass of the tokens more likely than it: all RACE_CANDIDATES
    thresholds in one read of the row (the masked-sum form reads it once per candidate)."""
    probs, pc = probs.contiguous(), pc.contiguous()
    out = torch.empty_like(pc)
    _mass_above_kernel[(probs.shape[0],)](probs, pc, out, probs.shape[1], probs.stride(0), M=pc.shape[1],
                                          BLOCK=1024, num_warps=8)
    return out


def next_token(logits: Tensor, noise: Tensor | None, seen: Tensor | None, p: SamplingParams) -> tuple[Tensor, Tensor]:
    """One token per row, and its log-prob under the raw logits (fp32 [B, V] in).

    Sampling is an exponential race, argmax(probs / E) with E ~ Exp(1) (`noise`): an exact draw with no
    host sync. With top-p, the race's first RACE_CANDIDATES winners are checked against the nucleus and
    the first one inside it is taken; the race order restricted to a subset is a race on that subset, so
    this is an exact nucleus sample unless every candidate falls outside the nucleus (probability about
    (1 - top_p)^16), when the most likely token, always in the nucleus, is taken."""
    x = process_logits(logits, p, seen)
    if p.temperature <= 0:
        tok = x.argmax(-1)
    else:
        probs = x.softmax(-1)
        race = probs / noise
        if p.top_p >= 1.0:
            tok = race.argmax(-1)
        else:
            cand = race.topk(min(RACE_CANDIDATES, probs.shape[-1]), dim=-1).indices  # in race order
            keep = nucleus_keep(probs, cand, p.top_p)
            first = cand.gather(1, keep.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
            tok = torch.where(keep.any(1), first, probs.argmax(-1))
    return tok, logits.gather(1, tok[:, None]).squeeze(1) - logits.logsumexp(-1)


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's output function on int64: a bijection whose outputs pass as independent for
    inputs that differ by multiples of _GOLDEN (multiplies wrap mod 2^64, as on every torch backend)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_keys(streams: list[tuple[int, int]], rows: list[tuple[int, int]], device: torch.device | str) -> Tensor:
    """Each (prompt index, sample index) row's random stream, a SplitMix64 state: prompt i's stream is
    (seed, j) = streams[i] (the call's seed and i, or the prompt's own seed and 0), mixed with the sample."""
    seed = torch.tensor([_int64(streams[i][0] % (1 << 64)) for i, _ in rows], dtype=torch.int64)
    j = torch.tensor([streams[i][1] for i, _ in rows], dtype=torch.int64)
    s_ = torch.tensor([s_ for _, s_ in rows], dtype=torch.int64)
    return _mix(_mix(seed + j * _GOLDEN) + s_ * _GOLDEN).to(device)


def race_noise(keys: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Exp(1) draws [B, vocab] (fp32) for the exponential race, a pure function of each row's key, the
    step and the token id (counter-based: row b's draw at step t is the (t * vocab + v)-th output of its
    SplitMix64 stream). So a row's tokens do not depend on which rows share its batch, compaction or
    batch splits, and no generator state lives outside the captured step."""
    ctr = keys[:, None] + (step * vocab + torch.arange(vocab, device=keys.device)) * _GOLDEN
    u = (_shr(_mix(ctr), 40).float() + 0.5) * 2.0**-24  # the top 24 bits, centred: u in (0, 1)
    return -torch.log(u)


def sample_step(logits: Tensor, keys: Tensor, step: Tensor, seen: Tensor | None,
                p: SamplingParams) -> tuple[Tensor, Tensor]:
    """`next_token` with each row's counter-based noise for this step (none when greedy)."""
    noise = race_noise(keys, step, logits.shape[-1]) if p.temperature > 0 else None
    return next_token(logits, noise, seen, p)


_sample_step_compiled = None


def _picker(device: torch.device):
    """`sample_step`, compiled on CUDA (a handful of fused kernels instead of dozens of passes; the
    noise is computed inside them, never written out)."""
    global _sample_step_compiled
    if device.type != "cuda" or not _use_compile():
        return sample_step
    if _sample_step_compiled is None:
        _sample_step_compiled = torch.compile(sample_step, dynamic=True)
    return _sample_step_compiled


def _state_key(model: Transformer) -> tuple:
    # Graphs bake in tensor addresses and Python flags: any new parameter or buffer (the adapters' cast
    # operands) or LoRA switch needs a new graph.
    flags = tuple((m.disabled, m.merged, m.cast_once) for _, m in lora_modules(model))
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())) + flags


def _decode_forward(model: Transformer, tok: Tensor, pos: Tensor, mask: Tensor, cache: KVCache,
                    write_idx: Tensor) -> Tensor:
    h = model.run(tok[:, None], pos[:, None], mask, cache, write_idx)
    return model.logits(h[:, -1])


@dataclass
class SamplerState:
    """What `generate` keeps for one model between calls on CUDA: the static KV cache, the shared-prefix
    buffer and the CUDA graphs that point into them.

    Lifetime: made by the model's first CUDA `generate` call and held in `_STATES`, weakly keyed by the
    model, so it never outlives it. Later calls reuse it while their batch and length fit; a graph is
    keyed by the model's parameter and buffer addresses and LoRA flags, so a changed model gets a new one. Callers
    free it with `release(model)` before memory-hungry training and after removing an adapter. On CPU
    nothing is kept."""

    cache: KVCache | None = None
    prefix: KVCache | None = None  # [n_kv, L, D] per layer (batch dimension unused)
    graphs: dict = field(default_factory=dict)
    pool: object = None

    def clear(self) -> None:
        self.cache, self.prefix, self.graphs, self.pool = None, None, {}, None


_STATES: "weakref.WeakKeyDictionary[Transformer, SamplerState]" = weakref.WeakKeyDictionary()


def sampler_state(model: Transformer) -> SamplerState:
    """The model's kept sampler state, made on first use."""
    if model not in _STATES:
        _STATES[model] = SamplerState()
    return _STATES[model]


def release(model: Transformer) -> None:
    """Free the generation cache and CUDA graphs kept for `model` (call before memory-hungry training)."""
    st = _STATES.pop(model, None)
    if st is not None:
        st.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _use_compile() -> bool:
    return os.environ.get("CODE_EDIT_COMPILE", "1") != "0"


def _merge_lora(device: torch.device) -> bool:
    """Sample from an active adapter merged into the base weights: opt-in (CODE_EDIT_MERGE_LORA=1), CUDA
    only. It is 1.31x faster at the distillation shape (BENCHMARKS "Rollout engine"), but rounding
    W + scale*B@A to bf16 loses the part of the adapter below half an ulp of W (15% of it at B ~ 1e-3),
    so the merged student is not the network the trainer differentiates."""
    return device.type == "cuda" and os.environ.get("CODE_EDIT_MERGE_LORA", "0") == "1"


def _use_graphs() -> bool:
    return os.environ.get("CODE_EDIT_CUDA_GRAPHS", "1") != "0"


class _Decoder:
    """Runs one decode step and its sampling, through a CUDA graph when on CUDA, else eagerly."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.L = cache.prefix_k[0].shape[1] if cache.prefix_k is not None else 0
        self.cuda = cache.k[0].is_cuda and _use_graphs()
        # The model cannot change during one generate call: key its graphs once, not per token.
        self.state = _state_key(model) if self.cuda else None
        self.eng = sampler_state(model) if self.cuda else None
        self.fwd = _decode_forward
        if self.cuda and _use_compile() and os.environ.get("CODE_EDIT_COMPILE_DECODE", "1") == "1":
            # Regional: compiling the whole step recompiles for every batch bucket, window and cache
            # layout; one compiled block with symbolic shapes serves every layer and size
            # (bench/decode_modes.py measures it against graph replay of eager kernels).
            model.compile_blocks(decode=True)

    def view(self, B: int) -> KVCache:
        """The first B rows, with all their slots: the mask says how many are attended. (Whole rows keep
        the views contiguous, so one compiled block serves every window.)"""
        c = self.cache
        return KVCache([t[:B] for t in c.k], [t[:B] for t in c.v], c.prefix_k, c.prefix_v)

    def __call__(self, pick, params: SamplingParams, tok: Tensor, pos: Tensor, mask: Tensor, write_idx: Tensor,
                 key: Tensor, step: Tensor, seen: Tensor | None) -> tuple[Tensor, Tensor]:
        """One step attending over the first mask.shape[-1] slots (see ATTEND_STEP), sampler included:
        the next token and its log-prob per row. The noise is a function of (key, step), so the whole
        step, sampling too, replays from one CUDA graph."""
        B, S = tok.shape[0], mask.shape[-1]
        inputs = (tok, pos, mask, write_idx, key, step) + ((seen,) if seen is not None else ())

        def step_fn(cache, t, p, m, w, k, n, *sn):
            return pick(self.fwd(self.model, t, p, m, cache, w), k, n, sn[0] if sn else None, params)

        if not self.cuda:
            return step_fn(self.view(B), *inputs)
        key_ = (B, S, self.L, self.state, params, seen is None)
        g = self.eng.graphs.get(key_)
        if g is None:
            if self.eng.pool is None:
                self.eng.pool = torch.cuda.graph_pool_handle()
            cache = self.view(B)
            g = GraphedStep(lambda *a: step_fn(cache, *a), inputs, pool=self.eng.pool)
            self.eng.graphs[key_] = g
        return g(*inputs)


def _plan_rows(model: Transformer, S: int, n_rows: int, max_batch: int | None, prefix_slots: int = 0) -> int:
    """How many sequences of S own cache slots fit at once (beside a shared prefix of `prefix_slots`):
    the KV cache sized from free GPU memory, a fixed cap on CPU."""
    if max_batch:
        return max(1, min(n_rows, max_batch))
    cfg = model.config
    p = model.lm_head.weight
    if p.device.type != "cuda":
        return max(1, min(n_rows, 64))
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * p.element_size()
    per_row = per_slot * S + cfg.vocab_size * 4 * 6  # KV; fp32 logits, processed logits, sort buffers, noise
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # the allocator's idle blocks (training's)
    eng = _STATES.get(model)
    if eng is not None:  # the kept cache and prefix can be reused, count them as free
        for c in (eng.cache, eng.prefix):
            if c is not None:
                free += sum(t.numel() * t.element_size() for t in c.k + c.v)
    budget = 0.85 * free - 2 * 1024**3 - per_slot * prefix_slots  # headroom: prefill activations, graph pool
    return max(1, min(n_rows, int(budget // per_row), MAX_ROWS))


def _get_cache(model: Transformer, B: int, S: int, dtype, device) -> KVCache:
    if device.type != "cuda":
        return KVCache.empty(model.config, B, S, dtype, device)
    eng = sampler_state(model)
    c = eng.cache
    if c is None or c.batch < B or c.length < S:
        eng.clear()
        torch.cuda.empty_cache()
        # Round up so nearby shapes reuse the cache and its graphs.
        eng.cache = KVCache.empty(model.config, B, 64 * math.ceil(S / 64), dtype, device)
    return eng.cache


def _get_prefix(model: Transformer, L: int, dtype, device) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer [n_kv, L, D] prefix buffers (views of a kept, larger one on CUDA, so graphs stay valid)."""
    cfg = model.config
    if device.type != "cuda":
        c = KVCache.empty(cfg, 1, L, dtype, device)
        return [t[0] for t in c.k], [t[0] for t in c.v]
    eng = sampler_state(model)
    if eng.prefix is None or eng.prefix.length < L:
        eng.graphs = {}  # they point at the old buffer
        eng.prefix = None
        torch.cuda.empty_cache()
        eng.prefix = KVCache.empty(cfg, 1, 256 * math.ceil(L / 256), dtype, device)
    return [t[0, :, :L] for t in eng.prefix.k], [t[0, :, :L] for t in eng.prefix.v]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int | Sequence[int],
             temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             num_samples: int | Sequence[int] = 1, stop_ids: list[int] | None = None,
             seed: int | Sequence[int] | None = None, max_batch: int | None = None) -> list[Completion]:
    """Sample `num_samples` completions for each prompt (token-id lists); temperature 0 is greedy.
    `max_new_tokens`, `num_samples` and `seed` may also give one value per prompt: with a seed per prompt,
    each prompt's samples are exactly those of a call of its own (rows draw independently of each other,
    see `race_noise`), so several prompts' sampling can share one batch.

    Returns completions ordered by (prompt_index, sample_index)."""
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    counts = [num_samples] * n if isinstance(num_samples, int) else list(num_samples)
    if len(counts) != n or any(c < 0 for c in counts):
        raise ValueError(f"generate: num_samples needs one count >= 0 per prompt ({n}), got {num_samples!r}")
    limits = ([operator.index(max_new_tokens)] * n if not isinstance(max_new_tokens, Sequence) else
              [max(0, operator.index(m)) for m in max_new_tokens])
    if len(limits) != n:
        raise ValueError(f"generate: max_new_tokens needs one limit per prompt ({n}), got {len(limits)}")
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"generate: seed needs one value per prompt ({n}), got {len(seed)}")
        streams = [(int(s_), 0) for s_ in seed]  # prompt i drawn as prompt 0 of a call seeded seed[i]
    else:
        seed = seed if seed is not None else torch.seed() % 2**63
        streams = [(seed, i) for i in range(n)]
    params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
    stops = list(model.config.eos_token_ids if stop_ids is None else stop_ids)
    device = model.lm_head.weight.device
    if max(limits, default=0) <= 0:
        return [Completion(i, s_, [], [], "length") for i in range(n) for s_ in range(counts[i])]

    was_training = model.training
    model.eval()
    try:
        # An active adapter is merged (opt-in), or its operands are cast once for the whole call.
        with (merged_for_inference(model) if _merge_lora(device) else
              cast_once(adapter_groups(model), model.lm_head.weight.dtype)):
            return _run_rows(model, prompts, counts, limits, params, stops, streams, max_batch)
    finally:
        model.train(was_training)


def _run_rows(model: Transformer, prompts: list[list[int]], counts: list[int], limits: list[int],
              params: SamplingParams, stops: list[int], streams: list[tuple[int, int]],
              max_batch: int | None) -> list[Completion]:
    """Every (prompt, sample) row, in batches that fit the GPU, longest prompts first (batches of similar
    length waste less padding); each row stops at its prompt's limit."""
    max_new_tokens = max(limits)
    shared = min(counts, default=0) >= 2 and len(prompts) <= SHARED_PREFIX_MAX_PROMPTS
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = [(i, s) for i in order if limits[i] > 0 for s in range(counts[i])]
    results = {(i, s): Completion(i, s, [], [], "length") for i in order if limits[i] <= 0 for s in range(counts[i])}
    start = 0
    while start < len(rows):
        P = len(prompts[rows[start][0]])
        if shared:
            n = _plan_rows(model, max_new_tokens, len(rows) - start, max_batch, len(prompts) * (P + 64))
        else:
            n = _plan_rows(model, P + max_new_tokens, len(rows) - start, max_batch)
        try:
            for c in _run_batch(model, prompts, rows[start:start + n], limits, params, stops, streams, shared):
                results[(c.prompt_index, c.sample_index)] = c
            start += n
        except torch.OutOfMemoryError:
            if n == 1:
                raise
            release(model)
            max_batch = max(1, n // 2)  # split and carry on: a long run never dies of it
    return [results[(i, s)] for i in range(len(prompts)) for s in range(counts[i])]


def _prefill(model: Transformer, prompts: list[list[int]], cache: KVCache, row_prompt: Tensor, P: int) -> Tensor:
    """Run each distinct prompt once (left-padded to P), copy its keys/values into the rows that sample
    from it (or, with a shared prefix, once into the prefix: prompt j at slots [jP, (j+1)P)), and return
    each row's next-token logits (fp32)."""
    device = cache.k[0].device
    n = len(prompts)
    chunk = max(1, PREFILL_TOKENS // P)
    last = []
    for c0 in range(0, n, chunk):
        part = prompts[c0:c0 + chunk]
        ids = torch.zeros(len(part), P, dtype=torch.long, device=device)
        am = torch.zeros(len(part), P, dtype=torch.long, device=device)
        for j, p in enumerate(part):
            ids[j, P - len(p):] = torch.tensor(p, device=device)
            am[j, P - len(p):] = 1
        tmp = KVCache.empty(model.config, len(part), P, cache.k[0].dtype, device)
        h = model.run(ids, positions_from_mask(am), padding_mask(am), tmp, torch.arange(P, device=device))
        last.append(model.logits(h[:, -1]))
        if cache.prefix_k is not None:
            for L in range(len(cache.k)):
                for dst, src_t in ((cache.prefix_k[L], tmp.k[L]), (cache.prefix_v[L], tmp.v[L])):
                    kv, _, D = dst.shape
                    dst[:, c0 * P:(c0 + len(part)) * P] = src_t.transpose(0, 1).reshape(kv, len(part) * P, D)
            del tmp
            continue
        sel = (row_prompt >= c0) & (row_prompt < c0 + len(part))
        rows = sel.nonzero().squeeze(1)
        src = row_prompt[rows] - c0
        for L in range(len(cache.k)):
            cache.k[L][rows, :, :P] = tmp.k[L].index_select(0, src)
            cache.v[L][rows, :, :P] = tmp.v[L].index_select(0, src)
        del tmp
    return torch.cat(last).index_select(0, row_prompt)


@dataclass
class _Layout:
    """Where a batch's rows live in the KV cache: prompts left-padded to P; S own slots per row (the prompt
    and the new tokens, or only the new tokens beside a shared prefix of L slots); the first new token's
    own slot."""
    uniq: list[int]  # distinct prompt indices, longest first
    lens: Tensor  # each row's prompt length
    row_prompt: Tensor  # each row's index into uniq
    P: int
    S: int
    L: int
    first: int


def _layout(prompts: list[list[int]], rows: list[tuple[int, int]], max_new: int, shared: bool,
            device: torch.device) -> _Layout:
    uniq = sorted({i for i, _ in rows}, key=lambda i: -len(prompts[i]))
    slot = {i: j for j, i in enumerate(uniq)}
    lens = torch.tensor([len(prompts[i]) for i, _ in rows], device=device)
    row_prompt = torch.tensor([slot[i] for i, _ in rows], device=device)
    P = int(max(len(prompts[i]) for i in uniq))
    cuda = device.type == "cuda"
    # On CUDA lengths are rounded up so calls with similar prompts reuse the captured graphs.
    if shared:
        P = 64 * math.ceil(P / 64) if cuda else P
        S = 64 * math.ceil(max_new / 64) if cuda else max_new
        return _Layout(uniq, lens, row_prompt, P, S, len(uniq) * P, 0)
    S = 64 * math.ceil((P + max_new) / 64) if cuda else P + max_new
    return _Layout(uniq, lens, row_prompt, P, S, 0, P)


@dataclass
class _DecodeState:
    """Per-row decode state, all on the device. Row B0 of the output buffers absorbs the writes of filler
    rows (the ones that pad a compacted batch to a captured size)."""
    valid: Tensor  # the attention mask over [prefix slots | own slots]
    seen: Tensor | None  # tokens each row has seen (repetition penalty only)
    out_tok: Tensor
    out_lp: Tensor
    n_gen: Tensor
    row_id: Tensor  # output row of each batch slot
    key: Tensor  # each slot's random stream (see race_noise)
    done: Tensor
    pos: Tensor
    tok: Tensor | None  # the token fed to the next decode step (step 0 reads the prefill's logits)
    B: int  # live batch size
    limit: Tensor | None = None  # each slot's own token limit, where the batch's rows differ


def _start(prompts: list[list[int]], rows: list[tuple[int, int]], lay: _Layout, row_limits: list[int],
           params: SamplingParams, vocab: int, device: torch.device, shared: bool,
           streams: list[tuple[int, int]]) -> _DecodeState:
    """The state before the first new token: a row sees its own prompt's real tokens."""
    B0 = len(rows)
    max_new = max(row_limits)
    valid = torch.zeros(B0, lay.L + lay.S, dtype=torch.bool, device=device)
    if shared:
        j = torch.arange(lay.L, device=device)[None]
        rp = lay.row_prompt[:, None]
        valid[:, :lay.L] = (j >= rp * lay.P + lay.P - lay.lens[:, None]) & (j < (rp + 1) * lay.P)
    else:
        valid[:, :lay.P] = torch.arange(lay.P, device=device)[None] >= (lay.P - lay.lens)[:, None]
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B0, vocab, dtype=torch.bool, device=device)
        for r, (i, _) in enumerate(rows):
            seen[r, torch.tensor(prompts[i], device=device)] = True
    return _DecodeState(valid, seen, torch.zeros(B0 + 1, max_new, dtype=torch.long, device=device),
                        torch.zeros(B0 + 1, max_new, dtype=torch.float32, device=device),
                        torch.zeros(B0 + 1, dtype=torch.long, device=device), torch.arange(B0, device=device),
                        row_keys(streams, rows, device), torch.zeros(B0, dtype=torch.bool, device=device),
                        lay.lens.clone(), None, B0,
                        None if min(row_limits) == max_new else torch.tensor(row_limits, device=device))


def _compact(st: _DecodeState, cache: KVCache, S: int, B0: int, n_active: int) -> None:
    """Keep the live rows in the first slots of the same static cache, at the next captured batch size."""
    nb = _bucket(n_active, B0)
    if nb >= st.B:
        return
    keep = (~st.done).nonzero().squeeze(1)
    keep = torch.cat([keep, keep[:1].expand(nb - n_active)])  # fillers repeat a live row
    for t_ in cache.k + cache.v:
        view = t_[:, :, :S]
        view[:nb] = view.index_select(0, keep)
    filler = torch.arange(nb, device=keep.device) >= n_active
    st.row_id = torch.where(filler, B0, st.row_id[keep])
    st.key = st.key[keep]
    st.done = filler | st.done[keep]
    st.tok, st.pos, st.valid = st.tok[keep], st.pos[keep], st.valid[keep]
    st.seen = st.seen[keep] if st.seen is not None else None
    st.limit = st.limit[keep] if st.limit is not None else None
    st.B = nb


def _run_batch(model, prompts, rows, limits, params, stops, streams, shared=False) -> list[Completion]:
    """Sample `rows` ((prompt index, sample index) pairs) to at most their prompt's limit of tokens each."""
    row_limits = [limits[i] for i, _ in rows]
    max_new = max(row_limits)
    # 1) the cache layout and the prefill
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    lay = _layout(prompts, rows, max_new, shared, device)
    B0, S, L, first = len(rows), lay.S, lay.L, lay.first
    cache = _get_cache(model, B0, S, dtype, device)
    if shared:
        cache = KVCache(cache.k, cache.v, *_get_prefix(model, L, dtype, device))
    logits = _prefill(model, [prompts[i] for i in lay.uniq], cache, lay.row_prompt, lay.P)
    # 2) decode, with no host sync except every SYNC_EVERY steps (the finished rows are compacted away)
    st = _start(prompts, rows, lay, row_limits, params, model.config.vocab_size, device, shared, streams)
    stop_t = torch.tensor(stops or [-1], device=device)
    write = torch.tensor([first], device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    dec, pick = _Decoder(model, cache), _picker(device)
    for t in range(max_new):
        if t > 0:
            st.valid[:, L + first + t - 1] = True
            # Attend over the filled slots rounded up to ATTEND_STEP, not all S: each step reads the
            # cache (the decode's main cost at large batch), and early steps need much less of it.
            window = min(S, ATTEND_STEP * math.ceil((first + t) / ATTEND_STEP))
            nxt, chosen = dec(pick, params, st.tok, st.pos, st.valid[:, None, None, :L + window], write, st.key,
                              step, st.seen)
            st.pos += 1
            write += 1
        else:  # the prefill's logits
            nxt, chosen = pick(logits, st.key, step, st.seen, params)
        step += 1
        active = ~st.done
        st.out_tok[st.row_id, t] = torch.where(active, nxt, 0)
        st.out_lp[st.row_id, t] = torch.where(active, chosen, 0.0)
        st.n_gen[st.row_id] += active.long()
        st.done |= torch.isin(nxt, stop_t)
        if st.limit is not None:
            st.done |= st.limit <= t + 1
        if st.seen is not None:
            st.seen[torch.arange(st.B, device=device), nxt] = True
        st.tok = nxt
        if (t + 1) % SYNC_EVERY == 0 or t == max_new - 1:
            n_active = int((~st.done).sum())
            if n_active == 0:
                break
            _compact(st, cache, S, B0, n_active)
    # 3) the completions
    out_tok, out_lp, n_gen = st.out_tok.tolist(), st.out_lp.tolist(), st.n_gen.tolist()
    stop_set = set(stops)
    res = []
    for r, (i, s) in enumerate(rows):
        toks = out_tok[r][: n_gen[r]]
        res.append(Completion(i, s, toks, out_lp[r][: n_gen[r]], "stop" if toks and toks[-1] in stop_set else "length"))
    return res


def _bucket(n: int, cap: int) -> int:
    """Batch sizes the decode graphs are captured for: the full batch, or the next power of two."""
    b = 1 << (n - 1).bit_length()
    return cap if b >= cap else b
