"""The decoder network: one readable file for Llama, Qwen2/2.5 and Qwen3 checkpoints.

Module and parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so
checkpoints load without renaming and LoRA adapters save under PEFT's key names.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_attention, lora
from .config import ModelConfig


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b (2-D) with an fp32 result: fp32 accumulation, no rounding of logits to bf16 (the sampler's and
    the trainer's log-probs then agree). CPU builds lack the fp32-output bf16 matmul: they upcast."""
    a = a.to(b.dtype)
    if b.dtype == torch.float32:
        return a @ b
    if not b.is_cuda:
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale: the order transformers uses (matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse RoPE frequencies (fp32), with Llama-3's frequency-dependent scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mixed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, mixed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class KVCache:
    """Preallocated keys/values, one [B, n_kv_heads, S, head_dim] pair per layer. Optionally a shared
    prefix, one [n_kv_heads, L, head_dim] pair per layer that every row may attend to (the prompts that
    many rows sample from, stored once: see `attend`); decode masks then span L + S slots, prefix first."""

    k: list[Tensor]
    v: list[Tensor]
    prefix_k: list[Tensor] | None = None
    prefix_v: list[Tensor] | None = None

    def layer(self, i: int) -> tuple[Tensor, ...]:
        if self.prefix_k is None:
            return self.k[i], self.v[i]
        return self.k[i], self.v[i], self.prefix_k[i], self.prefix_v[i]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        z = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls([z() for _ in range(cfg.num_layers)], [z() for _ in range(cfg.num_layers)])

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def select(self, rows: Tensor) -> "KVCache":
        """A new cache holding the given rows (repeats allowed: copy a prompt's cache to N samples)."""
        return KVCache([t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, ...] | None = None, write_idx: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), getattr(self, "fused", None))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is None:
            out = attend(q, k, v, mask)
        elif T == 1 and decode_attention.usable(q):  # the kernel writes the new token, then attends
            qg = q.view(B, self.n_kv, -1, self.head_dim)
            out = decode_attention.decode_attention(qg, cache[0], cache[1], mask, cache[2:] or None, (k, v, write_idx))
            out = out.view(B, self.n_heads, 1, self.head_dim)
        else:  # write this chunk at `write_idx`, then attend over the first S slots
            cache[0].index_copy_(2, write_idx, k)
            cache[1].index_copy_(2, write_idx, v)
            prefix = cache[2:] or None
            S = mask.shape[-1] - (prefix[0].shape[1] if prefix else 0)
            out = attend(q, cache[0][:, :, :S], cache[1][:, :, :S], mask, prefix)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Segments(NamedTuple):
    """Sequences laid end to end in one row (B = 1, packed training), each attending causally within
    itself only. starts: int32 [S + 1], the cumulative lengths (0 first, T last; empty segments allowed);
    longest: a bound on every segment's length (the flash kernel's grid: fixed, so that one captured step
    serves any batch of its shape)."""
    starts: Tensor
    longest: int


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | Segments | None,
           prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Grouped-query attention. mask: bool [B, 1, T, S] (True = may attend), None for plain causal, or
    Segments for packed rows. Decode (T == 1) may also attend to a `prefix` (keys, values [n_kv, L, D])
    shared by all rows; the mask then covers [prefix | own slots] ([B, 1, 1, L + S])."""
    if isinstance(mask, Segments):
        return _attend_segments(q, k, v, mask)
    if mask is None:  # no cache here, so T == S; a constant flag keeps the length symbolic under torch.compile
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    B, H, T, D = q.shape
    kv = k.shape[1]
    g = H // kv
    if T == 1:  # the torch form of decode attention (Attention.forward takes the kernel where it can)
        return _attend_decode(q.view(B, kv, g, D), k, v, mask, prefix).reshape(B, H, 1, D)
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attend_segments(q: Tensor, k: Tensor, v: Tensor, seg: Segments) -> Tensor:
    """Block-diagonal causal attention over one packed row (q [1, H, T, D], k, v [1, kv, T, D]). In half
    precision on CUDA: flash attention's variable-length kernel, which visits each segment's own
    triangle only (GQA native). Elsewhere (CPU, fp32): dense attention under the block-diagonal causal
    mask built on the device, so it needs no host sync either."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn
        qs, ks, vs = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [T, heads, D]
        out = varlen_attn(qs, ks, vs, seg.starts, seg.starts, seg.longest, seg.longest, window_size=(-1, 0))
        return out.transpose(0, 1)[None]
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    which = torch.searchsorted(seg.starts[1:].to(torch.long), t, right=True)  # segment of each position
    mask = (which[:, None] == which[None, :]) & (t[:, None] >= t[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _attend_decode(qg: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: tuple[Tensor, Tensor] | None) -> Tensor:
    """One decode step's attention, query heads grouped per KV head (qg [B, kv, g, D]) so the cache is read
    once, not copied g times. With a shared prefix, its scores are one [B*g, D] x [D, L] product per KV head;
    each part (prefix, own slots) gets its own softmax in its own layout, and the two are merged by their
    maxima and sums (as split-KV decoding does), so no [B, H, L + S] score tensor is concatenated or
    transposed (those copies were most of a step at 256 rows: BENCHMARKS "Rollout engine")."""
    B, kv, g, D = qg.shape
    scale = 1.0 / math.sqrt(D)
    L = prefix[0].shape[1] if prefix is not None else 0
    s = torch.matmul(qg, k.transpose(-1, -2)).float().mul(scale).masked_fill(~mask[..., L:], float("-inf"))
    if prefix is None:
        return torch.matmul(s.softmax(-1).to(v.dtype), v)
    pk, pv = prefix
    qf = qg.transpose(0, 1).reshape(kv, B * g, D)
    sp = torch.bmm(qf, pk.transpose(1, 2)).view(kv, B, g, L).float().mul(scale)
    sp = sp.masked_fill(~mask[..., :L].permute(1, 0, 2, 3), float("-inf"))  # [1, B, 1, L]: the row's own prompt
    o_own, m_own, d_own = _partial_softmax_values(s, lambda e: torch.matmul(e, v), v.dtype)
    o_pre, m_pre, d_pre = _partial_softmax_values(
        sp, lambda e: torch.bmm(e.view(kv, B * g, L), pv).view(kv, B, g, D), v.dtype)
    o_pre, m_pre, d_pre = o_pre.transpose(0, 1), m_pre.transpose(0, 1), d_pre.transpose(0, 1)  # small: [B, kv, g, .]
    m = torch.maximum(m_own, m_pre)  # finite: a row sees its prompt and its newest token
    w_own, w_pre = (m_own - m).exp(), (m_pre - m).exp()  # exp(-inf) = 0 for a part with no visible slot
    out = o_own.float() * w_own + o_pre.float() * w_pre
    return (out / (d_own * w_own + d_pre * w_pre)).to(v.dtype)


def _partial_softmax_values(s: Tensor, values, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """exp(s - max) (cast to the values' dtype) times the values, the max and the sum of the exponentials
    (both [..., 1]), for scores s [..., N] (fp32, -inf where masked). A part with no visible slot gives
    max -inf: its exponentials are computed against 0 instead, so they are 0, not NaN."""
    m = s.amax(-1, keepdim=True)
    e = (s - torch.where(m.isfinite(), m, 0.0)).exp()
    return values(e.to(dtype)), m, e.sum(-1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), getattr(self, "fused", None))
        return self.down_proj(F.silu(gate) * up)


FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))  # one input each
SINGLE_PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def grouped(mods: tuple[nn.Module, ...], fused: tuple[Tensor, Tensor | None] | None) -> bool:
    """Whether `project` runs these projections' adapters as one grouped product."""
    return fused is not None and lora.groupable(mods)


def adapter_groups(model: nn.Module) -> list[tuple[lora.LoraLinear, ...]]:
    """The adapters as `project` runs them: q/k/v and gate/up as one group each where `grouped`, every
    other adapter alone."""
    out = []
    for layer in model.model.layers:
        for owner, names in FUSED_GROUPS:
            owner = getattr(layer, owner)
            mods = tuple(getattr(owner, n) for n in names)
            out += [mods] if grouped(mods, getattr(owner, "fused", None)) else [(m,) for m in mods]
        out += [(getattr(getattr(layer, owner), name),) for owner, name in SINGLE_PROJECTIONS]
    return [g for g in out if all(isinstance(m, lora.LoraLinear) for m in g)]


def project(x: Tensor, mods: tuple[nn.Module, ...], fused: tuple[Tensor, Tensor | None] | None) -> list[Tensor]:
    """Several projections of one input. With fused weights (see `Transformer.fuse_projections`) the base
    products are one matmul and the adapters' terms are added to it: as one grouped product
    (lora.grouped_delta) when they are alike, else each module's `delta` to its slice. A merged adapter
    lives in the fused weight too; only a merged one switched off needs each module's saved base."""
    if fused is None or any(getattr(m, "merged", False) and m.disabled for m in mods):
        return [m(x) for m in mods]
    out, sizes = F.linear(x, *fused), [m.weight.shape[0] for m in mods]
    if grouped(mods, fused):  # every adapter in two matmuls, added before the split
        return list((out + mods[0].scale * lora.grouped_delta(x, mods)).split(sizes, dim=-1))
    deltas = [m.delta(x) if isinstance(m, lora.LoraLinear) else None for m in mods]
    return [o if d is None else o + m.scale * d for o, m, d in zip(out.split(sizes, dim=-1), mods, deltas)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, write_idx=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, write_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """bool [B, 1, T, T]: causal and not padding. A padded query may see itself, so no row is empty
    (an all-masked row would turn into NaN and leak through the attention matmul)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal & attention_mask.bool()[:, None, :]
    return (keep | torch.eye(T, dtype=torch.bool, device=attention_mask.device))[:, None]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Left-padded rows count positions from their first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self._compiled_blocks: list | None = None  # see compile_blocks; a plain list keeps state_dict names
        self._compiled_decode = False  # cached forwards through the compiled blocks too

    def compile_blocks(self, backend: str = "inductor", decode: bool = False) -> bool:
        """Compile the decoder block for cache-free forwards (training, teacher scoring), and with
        `decode` for cached decode steps too (generate asks for that on CUDA unless CODE_EDIT_COMPILE_DECODE=0).
        Every layer runs the same code, so one compiled graph (per grad mode / LoRA state / cache form)
        serves all of them ("regional" compilation: seconds to compile, not the minute a whole 30-layer
        step takes). On a small model this turns ~60 eager kernels per layer into a few fused ones.
        Returns whether it is on; CODE_EDIT_COMPILE=0 keeps everything eager."""
        if os.environ.get("CODE_EDIT_COMPILE", "1") == "0" or self.gradient_checkpointing:
            return False
        self._compiled_decode |= decode
        if decode:
            # Batch bucket and attention window are often equal (both 256, 512, ...); duck sizing would
            # then tie them into one symbol and compile again when they part.
            import torch.fx.experimental._config as fx_config
            fx_config.use_duck_shape = False
        if self._compiled_blocks is None:
            import torch._dynamo
            # grad on/off, LoRA on/off and dropout on/off each add a variant. Shapes are symbolic from the
            # start: a static first graph would be compiled again at the second length (minutes per run).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled_blocks = [torch.compile(layer, backend=backend, dynamic=True) for layer in self.model.layers]
        return True

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Store q/k/v and gate/up weights in one tensor each, the modules' parameters becoming views of
        it: one matmul instead of three (two) with no extra memory. Names, LoRA and PEFT keys unchanged.
        Redone automatically after `.to()`/`.cuda()`, which would otherwise split the storage again."""
        for layer in self.model.layers:
            for owner, names in FUSED_GROUPS:
                owner = getattr(layer, owner)
                mods = [getattr(owner, n) for n in names]
                if mods[0].weight.is_meta:
                    return
                w = torch.cat([m.weight for m in mods])
                b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
                start = 0
                for m in mods:
                    n = m.weight.shape[0]
                    m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
                    if b is not None:
                        m.bias = nn.Parameter(b[start:start + n], requires_grad=False)
                    start += n
                owner.fused = (w, b)
        self._fused = True

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_fused", False):
            self.fuse_projections()
        return out

    def reset_rope(self) -> None:
        """Recompute the RoPE buffer on the model's device (after meta-device construction)."""
        self.inv_freq = rope_inv_freq(self.config, self.model.norm.weight.device)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2], fp32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def run(self, input_ids: Tensor, positions: Tensor, mask: Tensor | Segments | None,
            cache: KVCache | None = None, write_idx: Tensor | None = None) -> Tensor:
        """Final-normed hidden states for explicit positions / mask / cache (the generator's entry; packed
        training passes restarting positions and Segments)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else cache.layer(i)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv, write_idx, use_reentrant=False)
            elif self._compiled_blocks is not None and (cache is None or self._compiled_decode and x.shape[1] == 1):
                x = self._compiled_blocks[i](x, cos, sin, mask, kv, write_idx)
            else:
                x = layer(x, cos, sin, mask, kv, write_idx)
        return self.model.norm(x)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, H] (the lm_head input), for fused losses."""
        if attention_mask is None or bool(attention_mask.all()):
            T = input_ids.shape[1]
            pos = torch.arange(T, device=input_ids.device).expand(input_ids.shape[0], T)
            return self.run(input_ids, pos, None)
        return self.run(input_ids, positions_from_mask(attention_mask), padding_mask(attention_mask))

    def logits(self, h: Tensor) -> Tensor:
        """fp32 next-token logits [N, V] of final-normed hidden states h [N, H] (the sampler's; the trainer's
        fused losses compute the same product chunk by chunk)."""
        return mm_fp32(h, self.lm_head.weight.t())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm_head(self.hidden(input_ids, attention_mask))
