"""Token ids of chat prompts and assistant completions as sampling and training see them, the answer
span the reward scores, and deterministic seeds derived from names."""
from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, the same on every machine and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def end_of_turn_id(tok: Any) -> int:
    """The token that closes an assistant turn in the tokenizer's chat family."""
    name = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(tok.family)
    tid = tok.token_to_id(name) if name else None
    if tid is None:
        if not tok.eos_ids:
            raise ValueError("tokenizer has no end-of-turn or eos token; cannot end SFT completions")
        return tok.eos_ids[0]
    return tid


def chat_ids(tok: Any, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a rendered chat; special tokens (and Llama's BOS, part of the string) parsed once."""
    return tok.encode(tok.chat(messages, add_generation_prompt=add_generation_prompt))


def completion_ids(tok: Any, text: str) -> list[int]:
    """An assistant completion as the model must produce it after the generation prompt: the text,
    then the end-of-turn token (tokenised apart from the prompt, exactly as sampling sees it)."""
    return tok.encode(text) + [end_of_turn_id(tok)]


def sft_ids(tok: Any, example: dict[str, list[dict[str, str]]]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an `sft_example`, the pair train.sft.sft takes."""
    return chat_ids(tok, example["prompt"]), completion_ids(tok, example["completion"][0]["content"])


def answer_span_positions(tok: Any, text: str, span: str) -> tuple[list[int], list[int]]:
    """(token ids of `text`, indices of the tokens that overlap the LAST occurrence of `span`).

    The span is located by characters and mapped to tokens with the tokenizer's offsets on the
    tokenisation of the whole text, so it is right for any chat family: Llama-3's BOS is part of
    the chat string and is parsed once, never added again (the reference scored one token off for
    Llama, docs/method.md 8.3 item 8).
    """
    start = text.rfind(span)
    if start < 0:
        raise ValueError(f"answer span {span!r} not found in the scored text")
    end = start + len(span)
    enc = tok.tk.encode(text, add_special_tokens=False)
    positions = [i for i, (a, b) in enumerate(enc.offsets) if b > start and a < end and b > a]
    if not positions or positions[0] == 0:
        raise ValueError(f"answer span {span!r} maps to no scorable token")
    return list(enc.ids), positions
