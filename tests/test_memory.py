"""train/memory.py: the activation estimate against a hand count, and "auto" checkpointing's choice on an
80 GB and a 141 GB GPU (memory faked), on a CPU, and inside SFT and distillation."""
from types import SimpleNamespace

import pytest
import torch

import train.memory as M
from model.config import ModelConfig
from train.sft import SFTConfig, sft

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

QWEN7B = ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128)


def fake_model(cfg: ModelConfig, device: str, element_size: int = 2):
    weight = SimpleNamespace(device=torch.device(device), element_size=lambda: element_size)
    return SimpleNamespace(config=cfg, lm_head=SimpleNamespace(weight=weight))


def test_activation_estimate_is_the_hand_count():
    # (12 x 3584 + 4 x 18944) elements x 28 layers x 12,288 tokens x 2 bytes
    assert M.activation_bytes(fake_model(QWEN7B, "cpu"), 12288) == 118784 * 28 * 12288 * 2
    # the 7B SFT step it was calibrated on kept 75.5 GiB (90.2 GiB peak less 14.7 GiB of weights and adapter)
    assert abs(M.activation_bytes(fake_model(QWEN7B, "cpu"), 12288) / 2**30 - 75.5) < 0.05 * 75.5
    assert M.activation_bytes(fake_model(QWEN7B, "cpu", element_size=4), 10) == 2 * M.activation_bytes(
        fake_model(QWEN7B, "cpu"), 10)


@pytest.mark.parametrize("usable_gib, want", [(65.0, True), (80.0, True), (95.0, False), (125.0, False)])
def test_auto_checkpoints_where_the_step_would_not_fit(monkeypatch, usable_gib, want):
    """An H100's 80 GB, less the 7B weights, cannot hold the 7B SFT step; an H200's 141 GB can. At 80 GiB
    the 76.1 GiB estimate would fit: only the margin (x 1.15 + 2 GiB = 89.5 GiB) says checkpoint."""
    monkeypatch.setattr(M, "usable_bytes", lambda device: int(usable_gib * 2**30))
    assert M.checkpointing("auto", fake_model(QWEN7B, "cuda"), 12288) is want
    assert M.checkpointing(True, fake_model(QWEN7B, "cuda"), 12288) is True  # a bool is kept
    assert M.checkpointing(False, fake_model(QWEN7B, "cuda"), 12288) is False


def test_auto_is_off_on_a_cpu_and_other_settings_are_refused(monkeypatch):
    monkeypatch.setattr(M, "usable_bytes", lambda device: pytest.fail("a CPU has no CUDA memory to ask"))
    assert M.checkpointing("auto", fake_model(QWEN7B, "cpu"), 10**9) is False
    with pytest.raises(ValueError, match="'sometimes'"):
        M.checkpointing("sometimes", fake_model(QWEN7B, "cpu"), 1)


def test_sft_asks_auto_with_its_longest_step_and_obeys(monkeypatch):
    """SFT resolves "auto" once, for its longest packed step (rounded to PACK_STEP), and trains with the
    answer: checkpointed layers when it says so, the same losses either way."""
    from test_sft import COMPLETION, PROMPT, lora_model
    asked, seen, losses = [], [], {}
    for answer in (False, True):
        monkeypatch.setattr("train.sft.checkpointing", lambda s, m, t, a=answer: asked.append((s, t)) or a)
        model, params = lora_model()
        real_run = model.run
        model.run = lambda *a, **k: seen.append(model.gradient_checkpointing) or real_run(*a, **k)
        out = sft(model, [(PROMPT, COMPLETION)] * 3, params, SFTConfig(lr=1e-2, epochs=2, batch_size=2,
                                                                       stop_loss=None, grad_checkpointing="auto"))
        assert set(seen) == {answer} and not model.gradient_checkpointing  # restored after
        seen.clear()
        losses[answer] = out["losses"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert asked == [("auto", 1024)] * 2  # 2 rows x 11 positions, rounded up to PACK_STEP


def test_graphs_follow_the_resolved_choice_not_the_setting(monkeypatch):
    """CUDA graphs are off under checkpointing: sft hands use_cuda_graphs the resolved bool, never "auto"."""
    from test_sft import COMPLETION, PROMPT, lora_model
    import train.sft as S
    cuda, cfg = torch.device("cuda"), SFTConfig(lr=1e-3, epochs=1, batch_size=1, grad_checkpointing="auto")
    assert S.use_cuda_graphs(cuda, cfg, False) and not S.use_cuda_graphs(cuda, cfg, True)
    got = []
    real = S.use_cuda_graphs
    monkeypatch.setattr(S, "use_cuda_graphs", lambda device, c, ckpt: got.append(ckpt) or real(device, c, ckpt))
    monkeypatch.setattr(S, "checkpointing", lambda s, m, t: True)
    model, params = lora_model()
    sft(model, [(PROMPT, COMPLETION)], params, cfg)
    assert got == [True]


def test_bad_setting_is_named():
    from test_sft import COMPLETION, PROMPT, lora_model
    model, params = lora_model()
    with pytest.raises(ValueError, match="SFTConfig.grad_checkpointing"):
        sft(model, [(PROMPT, COMPLETION)], params, SFTConfig(lr=1e-3, epochs=1, batch_size=1, grad_checkpointing="on"))


def test_distillation_asks_auto_per_micro_batch(monkeypatch):
    """Each micro-batch's student pass asks with its own padded token count and runs checkpointed when told."""
    from test_distill import PROMPTS, config, small_vocab_lora
    from model.lora import lora_parameters
    from train.distill import Distiller
    asked, seen = [], []
    monkeypatch.setattr("train.distill.checkpointing", lambda s, m, t: asked.append((s, t)) or len(asked) == 1)
    model = small_vocab_lora()
    real_hidden = model.hidden
    model.hidden = lambda ids: seen.append((model.training, model.gradient_checkpointing, ids.numel())) or real_hidden(ids)
    d = Distiller(model, lora_parameters(model), config(micro_batches=2, grad_checkpointing="auto"), stop_ids=[2])
    d.compute_gradients(PROMPTS, seed=11)
    student = [(ckpt, n) for training, ckpt, n in seen if training]
    assert [s for s, _ in asked] == ["auto", "auto"] and [n for _, n in asked] == [n for _, n in student]
    assert [ckpt for ckpt, _ in student] == [True, False] and not model.gradient_checkpointing
