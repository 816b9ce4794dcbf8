"""The network and how tokens come out of it: config, decoder, loading, tokenizer."""
from .config import ModelConfig
from .decoder import KVCache, Transformer
from .load import load_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["ModelConfig", "KVCache", "Transformer", "load_model", "Tokenizer", "load_tokenizer"]
from .generate import Completion, generate  # noqa: E402

__all__ += ["Completion", "generate"]
