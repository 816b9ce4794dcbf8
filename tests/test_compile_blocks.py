"""Transformer.compile_blocks (regional compilation for training forwards) against the eager model:
same hidden states and LoRA gradients, cached generation untouched, parameter names unchanged."""
import pytest
import torch

from model import load_model
from model.generate import generate
from model.lora import LoraConfig, add_lora, disabled, lora_parameters


def _model():
    torch.manual_seed(0)
    m = load_model("tiny-random", dtype=torch.float32)
    add_lora(m, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for p in lora_parameters(m):  # B starts at zero: make the adapter matter
        torch.nn.init.normal_(p, std=0.05)
    return m


def _loss_and_grads(m, ids):
    m.zero_grad(set_to_none=True)
    h = m.hidden(ids)
    loss = (m.lm_head(h).float().log_softmax(-1)[..., 0]).mean()
    loss.backward()
    return h.detach(), [p.grad.clone() for p in lora_parameters(m)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_match_eager(backend, monkeypatch):
    monkeypatch.delenv("CODE_EDIT_COMPILE", raising=False)
    torch._dynamo.reset()
    eager, comp = _model(), _model()
    names = list(comp.state_dict())
    assert comp.compile_blocks(backend=backend)
    assert list(comp.state_dict()) == names  # the compiled wrappers are not registered submodules
    eager.train(), comp.train()
    for T in (7, 11):  # two lengths: the static graph, then the dynamic recompile
        ids = torch.randint(0, eager.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        he, ge = _loss_and_grads(eager, ids)
        hc, gc = _loss_and_grads(comp, ids)
        torch.testing.assert_close(hc, he, atol=1e-5, rtol=1e-5)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    comp.eval(), eager.eval()
    with torch.no_grad(), disabled(comp), disabled(eager):  # the teacher's path: LoRA off, no grad
        torch.testing.assert_close(comp.hidden(ids), eager.hidden(ids), atol=1e-5, rtol=1e-5)
    # cached decoding does not go through the compiled blocks and gives the same tokens
    prompt = [[5, 9, 3, 17]]
    a = generate(comp, prompt, max_new_tokens=6, temperature=0.0)[0].tokens
    b = generate(eager, prompt, max_new_tokens=6, temperature=0.0)[0].tokens
    assert a == b


def test_compile_blocks_respects_switches(monkeypatch):
    m = _model()
    monkeypatch.setenv("CODE_EDIT_COMPILE", "0")
    assert not m.compile_blocks() and m._compiled_blocks is None
    monkeypatch.delenv("CODE_EDIT_COMPILE")
    m.gradient_checkpointing = True  # checkpointed layers stay eager (recompute inside a compiled graph)
    assert not m.compile_blocks() and m._compiled_blocks is None


def test_compiled_decode_blocks_match_eager_without_recompiling(monkeypatch):
    """compile_blocks(decode=True): cached decode steps (per-row caches and the shared prompt prefix,
    LoRA on) through the compiled block give the eager tokens, and calls of other batch sizes, prompt
    lengths and windows reuse the compiled graphs instead of compiling new ones."""
    from torch._dynamo.utils import counters
    monkeypatch.delenv("CODE_EDIT_COMPILE", raising=False)
    torch._dynamo.reset()
    eager, comp = _model(), _model()
    assert comp.compile_blocks(decode=True)
    base = counters["stats"]["unique_graphs"]  # a global tally: other tests' graphs count too
    g = torch.Generator().manual_seed(0)

    def calls(lens, samples):
        prompts = [torch.randint(1, eager.config.vocab_size, (n,), generator=g).tolist() for n in lens]
        for m in (comp, eager):
            out = generate(m, prompts, max_new_tokens=9, temperature=0.0, num_samples=samples, stop_ids=[])
            yield [c.tokens for c in out]

    # per-row caches, the shared prefix, and one row (size 1 is always its own graph): then all forms exist
    warmup = [((5, 9), 1), ((4, 7, 3), 2), ((6,), 1)]
    later = [((8, 3, 5, 2, 7), 1), ((10, 4), 4), ((3,), 3), ((12, 2, 6), 1)]
    for i, (lens, samples) in enumerate(warmup + later):
        a, b = calls(lens, samples)
        assert a == b, (lens, samples)
        if i == len(warmup) - 1:
            warm = counters["stats"]["unique_graphs"]
    assert 2 <= warm - base <= 3  # one graph per form
    assert counters["stats"]["unique_graphs"] == warm  # new batch sizes and lengths compiled nothing new
