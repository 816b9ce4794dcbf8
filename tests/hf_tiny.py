"""Random tiny transformers checkpoints (Llama-3, Qwen2, Qwen3) for parity tests, saved as safetensors."""
from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_config(kind: str, *, tie: bool = False, vocab: int = 97):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama3":
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=24, rope_theta=1000000.0)  # head_dim != hidden/heads on purpose
    raise ValueError(kind)


def make_hf_model(kind: str, path: Path, *, tie: bool = False, seed: int = 0):
    """Build a seeded random transformers model, randomise every parameter (biases and norms
    included, so nothing is trivially zero or one), save it, and return it in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, tie=tie), attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()
