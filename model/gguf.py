"""Read a GGUF checkpoint (llama / qwen2 / qwen3) into our config and tensor names, dequantized.

llama.cpp's converter permutes the rows of Llama-family q/k weights (interleaved RoPE layout);
we undo it so the weights fit the `rotate_half` convention. Qwen GGUFs are stored unpermuted.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_reader(path: str | Path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ValueError(f"corrupt or unreadable GGUF file {path}: {e}") from None


def metadata(path: str | Path) -> dict[str, Any]:
    """The file's key/value metadata, decoded once per file version (the model and the tokenizer
    both need it; decoding the 49k-token vocabulary and merges takes seconds)."""
    p = Path(path).resolve()
    return _metadata(p, p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _metadata(path: Path, mtime_ns: int) -> dict[str, Any]:
    return {name: field.contents() for name, field in open_reader(path).fields.items()}


def our_name(gguf_name: str, path: Path) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"{path}: unknown tensor {gguf_name} (not a Llama/Qwen GGUF tensor name)")


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    import gguf

    path = Path(path)
    reader = open_reader(path)
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF with precomputed rope_freqs (Llama-3.1 scaling) is not supported; "
                         "load the safetensors checkpoint instead")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = a("attention.head_count")
    hf = {
        "architectures": [_ARCHS[arch]],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv", heads),
        "head_dim": a("attention.key_length") or a("embedding_length") // heads,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": a("rope.freq_base", 10000.0),
        "max_position_embeddings": a("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names and arch != "qwen2",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    cfg = ModelConfig.from_hf(hf, source=str(path))
    tensors = {}
    for t in reader.tensors:
        name = our_name(t.name, path)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims innermost first
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        tensors[name] = w
    return cfg, tensors
