"""Tokenizer over the `tokenizers` library, with hand-written chat templates and no default system prompt.

ChatML (Qwen, SmolLM2): `<|im_start|>{role}\\n{content}<|im_end|>\\n`; Llama-3: BOS, then
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>` (no "Cutting Knowledge Date").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers

from .load import resolve

# llama.cpp's "smollm"/"starcoder"/... pre-tokenizers split every digit before the GPT-2 rule.
_DIGIT_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


class Tokenizer:
    def __init__(self, tk: _HFTokenizer, *, eos_ids: list[int], bos_token: str | None, family: str | None = None):
        self.tk = tk
        vocab = tk.get_vocab(with_added_tokens=True)
        self.family = family or ("llama3" if "<|start_header_id|>" in vocab else
                                 "chatml" if "<|im_start|>" in vocab else None)
        end_of_turn = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(self.family)
        ids = list(eos_ids) + ([vocab[end_of_turn]] if end_of_turn in vocab else [])
        self.eos_ids = sorted(set(ids))
        self.bos_token = bos_token if self.family == "llama3" else None
        self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids; no BOS is added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.family == "chatml":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.family == "llama3":
            text = (self.bos_token or "") + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        raise ValueError("this tokenizer has neither ChatML nor Llama-3 chat tokens; no chat template known")


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    path = resolve(source)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"missing tokenizer.json in {path}")
    try:
        tk = _HFTokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"corrupt tokenizer file {file}: {e}") from None
    eos: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            e = json.loads(f.read_text()).get("eos_token_id")
            eos += [] if e is None else [e] if isinstance(e, int) else list(e)
    tc = path / "tokenizer_config.json"
    bos = None
    if tc.is_file():
        cfg = json.loads(tc.read_text())
        bos = _token_text(cfg.get("bos_token"))
        eos_tok = _token_text(cfg.get("eos_token"))
        if eos_tok and tk.token_to_id(eos_tok) is not None:
            eos.append(tk.token_to_id(eos_tok))
    if bos is None and tk.token_to_id("<|begin_of_text|>") is not None:
        bos = "<|begin_of_text|>"
    return Tokenizer(tk, eos_ids=eos, bos_token=bos)


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _from_gguf(path: Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer from the vocabulary, merges and pre-tokenizer type in the file."""
    from .gguf import metadata

    meta = metadata(path)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported, "
                         f"not {meta.get('tokenizer.ggml.model')!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") in _DIGIT_FIRST:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    # Control (3) and user-defined (4) tokens must match as whole strings before BPE runs.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t in (3, 4)])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(tk, eos_ids=[] if eos is None else [eos],
                     bos_token=tokens[bos] if bos is not None else None)
