"""Chat strings byte-exact to docs/method.md 2.1 for ChatML (Qwen, SmolLM2) and Llama-3, and eos ids."""
import json

import pytest
from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers

from model import load_tokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Who performed Hey Jude?\n"},
        {"role": "assistant", "content": "<think>\nx\n</think>\nThe answer now is Madonna."}]


def test_chatml_exact():
    tok = load_tokenizer("smollm2-135m-instruct")
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\n  Who performed Hey Jude?\n<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nx\n</think>\nThe answer now is Madonna.<|im_end|>\n")
    assert tok.chat(CONV, add_generation_prompt=False) == want
    assert tok.chat(CONV) == want + "<|im_start|>assistant\n"
    assert tok.family == "chatml" and tok.token_to_id("<|im_end|>") in tok.eos_ids
    ids = tok.encode(tok.chat(CONV[:1]))
    assert ids[0] == tok.token_to_id("<|im_start|>")  # special tokens parsed, no BOS added in front


@pytest.fixture()
def llama3_dir(tmp_path):
    """A minimal tokenizer.json with Llama-3's special tokens, and the eos list of generation_config."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>"]
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    tk = HFTok(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tk.save(str(tmp_path / "tokenizer.json"))
    ids = {s: tk.token_to_id(s) for s in specials}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}))
    return tmp_path, ids


def test_llama3_exact(llama3_dir):
    path, ids = llama3_dir
    tok = load_tokenizer(path)
    want = ("<|begin_of_text|>"
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWho performed Hey Jude?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nx\n</think>\nThe answer now is Madonna.<|eot_id|>")
    assert tok.chat(CONV, add_generation_prompt=False) == want
    assert tok.chat(CONV) == want + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert "Cutting Knowledge" not in tok.chat(CONV)
    assert tok.eos_ids == sorted({ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]})
    assert tok.encode(tok.chat(CONV[1:2]))[0] == ids["<|begin_of_text|>"]
