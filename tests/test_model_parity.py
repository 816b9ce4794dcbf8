"""Our decoder against transformers on random tiny Llama-3 / Qwen2 / Qwen3 checkpoints (fp32)."""
import pytest
import torch

from hf_tiny import make_hf_model
from model import load_model
from model.decoder import rope_inv_freq

CASES = [("llama3", False), ("qwen2", True), ("qwen2", False), ("qwen3", False)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in CASES])
def pair(request, tmp_path_factory):
    kind, tie = request.param
    path = tmp_path_factory.mktemp(kind)
    hf = make_hf_model(kind, path, tie=tie)
    ours = load_model(path, device="cpu")
    return hf, ours


def test_config_fields(pair):
    hf, ours = pair
    c = ours.config
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == c.tie_word_embeddings
    assert c.qkv_bias == (c.arch == "qwen2") and c.qk_norm == (c.arch == "qwen3")
    if c.arch == "qwen3":
        assert c.head_dim == 24


def test_logits_unpadded(pair):
    hf, ours = pair
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_logits_left_padded(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 97, (n,), generator=g) for n in (33, 7, 20)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    with torch.no_grad():
        got = ours(ids, mask)
        for i, r in enumerate(rows):
            alone = hf(r[None]).logits[0]
            assert (got[i, T - len(r):] - alone).abs().max().item() <= 1e-4
        # and transformers' own padded batch agrees at real positions
        ref = hf(ids, attention_mask=mask).logits
        assert ((got - ref).abs() * mask[..., None]).max().item() <= 1e-4
        assert torch.isfinite(got).all()


def test_greedy_20_tokens(pair):
    hf, ours = pair
    prompt = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                          min_new_tokens=20, pad_token_id=0)[0, 9:].tolist()
        x = prompt
        for _ in range(20):
            x = torch.cat([x, ours(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert x[0, 9:].tolist() == ref


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hf_tiny import hf_config
    from model.config import ModelConfig

    hf_cfg = hf_config("llama3")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]}))
    plain = rope_inv_freq(ModelConfig.from_hf(LlamaConfig(**{**hf_cfg.to_dict(), "rope_scaling": None}).to_dict()
                                              | {"architectures": ["LlamaForCausalLM"], "rope_parameters": None,
                                                 "rope_theta": 500000.0}))
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, plain)  # the scaling really changed some frequencies
