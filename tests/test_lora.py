"""model/lora.py against peft (the reference) on tiny transformers Llama-3 / Qwen2 checkpoints, and the
disabled / merge / remove / snapshot / PEFT-file contracts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hf_tiny import make_hf_model
from model import load_model
from model import lora as L


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path)
    return path


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def peft_model(path, cfg: L.LoraConfig):
    from peft import LoraConfig, get_peft_model

    pc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    target_modules=list(cfg.targets), task_type="CAUSAL_LM")
    return get_peft_model(hf_model(path), pc).eval()


def peft_layers(pm) -> dict:
    """peft's LoRA layers keyed by our module names (through peft's own objects, not our key mapping)."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def tokens(seed=1, shape=(2, 13)):
    return torch.randint(3, 97, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=5, std=0.1):
    """Non-zero A and B, so the adapter visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in L.lora_state(model).values():
            t.copy_(std * torch.randn(t.shape, generator=g))


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lm_loss(model, x):
    return F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())


# ---- parity with peft ----------------------------------------------------------------------------

def test_logits_and_grads_match_peft(ckpt):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    with torch.no_grad():
        base = ours(x)
    L.add_lora(ours)
    randomize(ours)
    pm = peft_model(ckpt, L.LoraConfig())
    layers = peft_layers(pm)
    mine = dict(L.lora_modules(ours))
    assert layers.keys() == mine.keys() and len(mine) == 2 * 7  # 2 layers x 7 projections
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A["default"].weight.copy_(mine[name].lora_A)
            m.lora_B["default"].weight.copy_(mine[name].lora_B)
            assert m.scaling["default"] == mine[name].scale == 2.0
    got, ref = ours(x), pm(input_ids=x).logits
    assert (got - base).abs().max().item() > 0.5  # the adapter matters
    assert (got - ref).abs().max().item() <= 1e-5
    got.square().mean().backward()
    ref.square().mean().backward()
    for name, m in layers.items():
        for ab in ("A", "B"):
            g_ref = getattr(m, f"lora_{ab}")["default"].weight.grad
            g = getattr(mine[name], f"lora_{ab}").grad
            assert g is not None and (g - g_ref).abs().max().item() <= 1e-5 * (1 + g_ref.abs().max().item())


def test_saved_adapter_loads_in_peft(ckpt, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    ours, x = load_model(ckpt, device="cpu"), tokens(2)
    L.add_lora(ours)
    randomize(ours)
    out = L.save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(ckpt))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ad"]  # no temp leftovers
    pc = PeftLoraConfig.from_pretrained(out)
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, set(pc.target_modules)) == (12, 24, 0.05, set(L.DEFAULT_TARGETS))
    assert pc.peft_type == "LORA" and pc.task_type == "CAUSAL_LM" and pc.base_model_name_or_path == str(ckpt)
    pm = PeftModel.from_pretrained(hf_model(ckpt), out).eval()
    with torch.no_grad():
        assert (ours(x) - pm(input_ids=x).logits).abs().max().item() <= 1e-5
    # peft writes the same adapter with exactly our key names and values
    pm.save_pretrained(tmp_path / "peft")
    theirs, mine = load_file(tmp_path / "peft" / L.WEIGHTS_FILE), load_file(out / L.WEIGHTS_FILE)
    assert theirs.keys() == mine.keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


def test_peft_adapter_loads_in_ours(ckpt, tmp_path):
    cfg = L.LoraConfig(rank=8, alpha=32, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    pm = peft_model(ckpt, cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "p")
    ours, x = load_model(ckpt, device="cpu"), tokens(3)
    params = L.load_adapter(ours, tmp_path / "p")
    got = L.lora_config(ours)
    assert (got.rank, got.alpha, got.dropout, set(got.targets)) == (8, 32, 0.1, set(cfg.targets))
    assert sorted(L.lora_state(ours)) == sorted(f"{k}.lora_{ab}" for k in peft_layers(pm) for ab in "AB")
    assert len(params) == 2 * 3 * 2
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        assert (ours(x) - ref).abs().max().item() <= 1e-5
    # loading into a model that already has a matching LoRA overwrites its weights in place
    other = load_model(ckpt, device="cpu")
    before = [id(p) for p in L.add_lora(other, cfg)]
    assert [id(p) for p in L.load_adapter(other, tmp_path / "p")] == before
    with torch.no_grad():
        assert (other(x) - ref).abs().max().item() <= 1e-5
    # ... and refuses a LoRA of another shape
    third = load_model(ckpt, device="cpu")
    L.add_lora(third)
    with pytest.raises(ValueError, match=r"adapter_config\.json: rank 8 differs"):
        L.load_adapter(third, tmp_path / "p")


# ---- disabled / merge / remove ----------------------------------------------------------------

def test_disabled_gives_base_exactly(ckpt):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    with torch.no_grad():
        base = ours(x)
    L.add_lora(ours)
    randomize(ours)
    n_tensors = len(list(ours.parameters())) + len(list(ours.buffers()))
    with torch.no_grad():
        on = ours(x)
        with L.disabled(ours):
            off = ours(x)
            assert len(list(ours.parameters())) + len(list(ours.buffers())) == n_tensors  # no weight copy
            with L.disabled(ours):
                inner = ours(x)
            after_inner = ours(x)  # the outer block is still in force
        again = ours(x)
        ours.train()
        with L.disabled(ours):
            off_train = ours(x)  # no dropout anywhere when disabled
        ours.eval()
    assert not torch.allclose(on, base, atol=0.1)
    for t in (off, inner, after_inner, off_train):
        assert torch.equal(t, base)
    assert torch.equal(again, on)
    with pytest.raises(RuntimeError, match="boom"):
        with L.disabled(ours):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(ours(x), on)


def test_merge_unmerge(ckpt):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    with torch.no_grad():
        base = ours(x)
    before = clone_state(ours)
    L.add_lora(ours)
    randomize(ours)
    q = ours.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        unmerged = ours(x)
        L.merge(ours)
        # naive formula: W + alpha/r * B @ A
        want = before["model.layers.0.self_attn.q_proj.weight"] + 2.0 * q.lora_B @ q.lora_A
        assert (q.weight - want).abs().max().item() <= 1e-6
        merged = ours(x)  # would be off by a whole LoRA term (~1) if forward double-added
        assert (merged - unmerged).abs().max().item() <= 2e-5  # fp32 noise of another summation order
        with L.disabled(ours):
            assert torch.equal(ours(x), base)  # merged + disabled uses the saved base weight
    with pytest.raises(ValueError, match="already merged"):
        L.merge(ours)
    with pytest.raises(ValueError, match="merged"):
        L.restore(ours, L.snapshot(ours))
    ours.train()
    with pytest.raises(RuntimeError, match="merged"):
        ours(x)
    ours.eval()
    L.unmerge(ours)
    with pytest.raises(ValueError, match="not merged"):
        L.unmerge(ours)
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # exact, not just fp32-close
    with torch.no_grad():
        assert torch.equal(ours(x), unmerged)


def test_merge_failing_halfway_leaves_no_module_merged(ckpt):
    """merge() is all or nothing: a module that cannot be merged (here an adapter of the wrong shape, in
    the middle of the model) puts back the ones merged before it, bit for bit."""
    ours = load_model(ckpt, device="cpu")
    L.add_lora(ours)
    randomize(ours)
    before = clone_state(ours)
    mods = L.lora_modules(ours)
    name, bad = mods[len(mods) // 2]
    bad.lora_A = nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(RuntimeError):
        L.merge(ours)
    assert not any(m.merged or "base_weight" in m._buffers for _, m in mods)
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(name + ".lora_A"))


@pytest.mark.parametrize("merged", [False, True])
def test_remove_restores_pristine_base_after_training(ckpt, merged):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    linears = {n: m for n, m in ours.named_modules() if type(m) is nn.Linear}
    params = dict(ours.named_parameters())
    before = clone_state(ours)
    with torch.no_grad():
        base = ours(x)
    opt = torch.optim.AdamW(L.add_lora(ours), lr=1e-2)
    ours.train()
    for _ in range(3):
        lm_loss(ours, x).backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(ours(x), base, atol=1e-3)
    if merged:
        L.merge(ours)
    L.remove(ours)
    assert not L.has_lora(ours) and not any(isinstance(m, L.LoraLinear) for m in ours.modules())
    for n, m in linears.items():
        assert ours.get_submodule(n) is m and type(m) is nn.Linear and not m.training
    after = ours.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p is params[n] and not p.requires_grad for n, p in ours.named_parameters())
    with torch.no_grad():
        assert torch.equal(ours(x), base)
    with pytest.raises(ValueError, match="no LoRA"):
        L.remove(ours)


# ---- dropout, init, gradients -----------------------------------------------------------------

def test_dropout_only_on_lora_input_in_train_mode():
    torch.manual_seed(0)
    net = nn.ModuleDict({"q_proj": nn.Linear(16, 24), "k_proj": nn.Linear(16, 24)})
    L.add_lora(net, L.LoraConfig(rank=4, alpha=8, dropout=0.5, targets=("q_proj",)))
    randomize(net)
    assert type(net["k_proj"]) is nn.Linear  # not targeted
    m, x = net["q_proj"], torch.randn(3, 16)
    W, b, A, B = (t.detach() for t in (m.weight, m.bias, m.lora_A, m.lora_B))
    net.train()
    torch.manual_seed(123)
    y = m(x)
    torch.manual_seed(123)
    keep = F.dropout(torch.ones_like(x), 0.5, True)  # the same mask, drawn independently
    assert torch.allclose(y, x @ W.T + b + 2.0 * ((x * keep) @ A.T @ B.T), atol=1e-6)
    assert not torch.equal(m(x), m(x))  # fresh masks per call
    with L.disabled(net):
        assert torch.equal(m(x), F.linear(x, W, b))
    no_dropout = x @ W.T + b + 2.0 * (x @ A.T @ B.T)
    L.set_dropout(net, 0.0)  # train mode with dropout off (as on-policy distillation runs)
    assert torch.allclose(m(x), no_dropout, atol=1e-6)
    L.set_dropout(net, 0.5)
    net.eval()
    y_eval = m(x)
    assert torch.equal(y_eval, m(x))
    assert torch.allclose(y_eval, no_dropout, atol=1e-6)


def test_seeded_init(ckpt):
    a, b, c = (load_model(ckpt, device="cpu") for _ in range(3))
    L.add_lora(a)
    L.add_lora(b)
    L.add_lora(c, L.LoraConfig(seed=1))
    sa, sb, sc = L.lora_state(a), L.lora_state(b), L.lora_state(c)
    for k, v in sa.items():
        assert v.dtype == torch.float32 and torch.equal(v, sb[k])
        if k.endswith("lora_B"):
            assert not v.any()
        else:  # kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(v.shape[1])
            assert v.shape[0] == 12 and v.abs().max() <= bound and v.abs().max() > 0.9 * bound
            assert not torch.equal(v, sc[k])
    # a fresh adapter after remove() is the same again, and reset() restores it in place
    L.remove(a)
    L.add_lora(a)
    randomize(a)
    L.reset(a)
    assert all(torch.equal(v, sb[k]) for k, v in L.lora_state(a).items())


def test_gradients_reach_only_lora(ckpt):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    ours.requires_grad_(True)  # add_lora must freeze the base, remove() must give the flags back
    params = L.add_lora(ours)
    randomize(ours, std=0.05)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} and len(params) == 2 * 14
    ours.train()
    lm_loss(ours, x).backward()
    for n, p in ours.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    L.remove(ours)
    assert all(p.requires_grad for p in ours.parameters())


def test_bf16(ckpt):
    ours, x = load_model(ckpt, dtype=torch.bfloat16, device="cpu"), tokens()
    ref32 = load_model(ckpt, device="cpu")
    before = clone_state(ours)
    with torch.no_grad():
        base = ours(x)
        noise = (base.float() - ref32(x)).abs().max().item()  # bf16 vs fp32 of the base model itself
    params = L.add_lora(ours)
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights (see LoraConfig)
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    randomize(ours, std=0.1)
    L.add_lora(ref32)
    L.restore(ref32, L.snapshot(ours))
    with torch.no_grad():
        y, y32 = ours(x), ref32(x)
        assert y.dtype == torch.bfloat16
        assert (y.float() - base.float()).abs().max().item() > 20 * noise  # the adapter matters
        assert (y.float() - y32).abs().max().item() <= 2.5 * noise  # and adds no more than bf16 noise
        with L.disabled(ours):
            assert torch.equal(ours(x), base)
        L.merge(ours)
        assert (ours(x).float() - y32).abs().max().item() <= 2.5 * noise
        with L.disabled(ours):
            assert torch.equal(ours(x), base)
    L.unmerge(ours)
    ours.train()
    lm_loss(ours, x).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    L.merge(ours)
    L.remove(ours)  # a bf16 W + delta - delta would not round-trip; the saved original does
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    bf = load_model(ckpt, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in L.add_lora(bf, L.LoraConfig(param_dtype=None)))


# ---- snapshot / restore / swapped ----------------------------------------------------------------

def test_snapshot_restore_swapped(ckpt):
    ours, x = load_model(ckpt, device="cpu"), tokens()
    with torch.no_grad():
        base = ours(x)
    params = L.add_lora(ours)
    fresh = L.snapshot(ours)
    randomize(ours)
    trained = L.snapshot(ours)
    with torch.no_grad():
        y = ours(x)
        with L.swapped(ours, fresh):
            assert torch.equal(ours(x), base)  # B = 0: exactly the base
        assert torch.equal(ours(x), y)
        with pytest.raises(RuntimeError, match="boom"):
            with L.swapped(ours, fresh):
                raise RuntimeError("boom")
        assert torch.equal(ours(x), y)
        L.restore(ours, fresh)
        assert torch.equal(ours(x), base)
        L.restore(ours, trained)
        assert torch.equal(ours(x), y)
    assert [id(p) for p in L.lora_parameters(ours)] == [id(p) for p in params]  # in place
    bad = dict(trained)
    k = next(iter(bad))
    bad[k] = bad[k][:, :3]
    with pytest.raises(ValueError, match=k.replace(".", r"\.") + " has shape"):
        L.restore(ours, bad)
    del bad[k]
    with pytest.raises(ValueError, match="missing"):
        L.restore(ours, bad)


# ---- errors -----------------------------------------------------------------------------------

def test_add_errors(ckpt):
    ours = load_model(ckpt, device="cpu").requires_grad_(True)
    with pytest.raises(ValueError, match="x_proj"):
        L.add_lora(ours, L.LoraConfig(targets=("q_proj", "x_proj")))
    with pytest.raises(ValueError, match="targets"):
        L.add_lora(ours, L.LoraConfig(targets="q_proj"))
    with pytest.raises(ValueError, match="param_dtype"):
        L.add_lora(ours, L.LoraConfig(param_dtype="fp32"))
    assert not L.has_lora(ours) and all(p.requires_grad for p in ours.parameters())  # untouched
    with pytest.raises(ValueError, match="no LoRA"):
        L.merge(ours)
    L.add_lora(ours)
    with pytest.raises(ValueError, match="already has LoRA"):
        L.add_lora(ours)


def test_load_adapter_errors(ckpt, tmp_path):
    src = load_model(ckpt, device="cpu")
    L.add_lora(src)
    good = L.save_adapter(src, tmp_path / "good")
    tensors = load_file(good / L.WEIGHTS_FILE)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def variant(name, tensors=tensors, **config):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / L.WEIGHTS_FILE))
        cfg = json.loads((good / L.CONFIG_FILE).read_text()) | config
        (d / L.CONFIG_FILE).write_text(json.dumps(cfg))
        return d

    cases = [
        (variant("missing", {k: v for k, v in tensors.items() if k != key}), f"{L.WEIGHTS_FILE}.*missing.*{key}"),
        (variant("extra", tensors | {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}),
         "unexpected.*lm_head"),
        (variant("shape", tensors | {key: torch.zeros(3, 12)}), f"{L.WEIGHTS_FILE}: {key} has shape"),
        (variant("ia3", peft_type="IA3"), f"{L.CONFIG_FILE}: peft_type='IA3'"),
        (variant("dora", use_dora=True), f"{L.CONFIG_FILE}: use_dora=True"),
        (variant("regex", target_modules=".*proj"), f"{L.CONFIG_FILE}: target_modules"),
    ]
    for d, pattern in cases:
        ours = load_model(ckpt, device="cpu")
        with pytest.raises(ValueError, match=pattern):
            L.load_adapter(ours, d)
        assert not L.has_lora(ours), d.name  # a failed load leaves the model untouched
    with pytest.raises(FileNotFoundError, match="nowhere"):
        L.load_adapter(load_model(ckpt, device="cpu"), tmp_path / "nowhere")


def test_save_over_existing_adapter(ckpt, tmp_path):
    ours = load_model(ckpt, device="cpu")
    L.add_lora(ours)
    L.save_adapter(ours, tmp_path / "ad")
    randomize(ours)
    L.save_adapter(ours, tmp_path / "ad")
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]
    other = load_model(ckpt, device="cpu")
    L.load_adapter(other, tmp_path / "ad")
    assert all(torch.equal(v, L.lora_state(ours)[k]) for k, v in L.lora_state(other).items())


@pytest.mark.parametrize("train", [False, True])
def test_grouped_delta_matches_each_module_alone(train):
    """The grouped adapter product (one A matmul, one block-diagonal B matmul, rank padded to RANK_ALIGN)
    against each module's B(A(dropout(x))) in float64 by hand: outputs and gradients, dropout masks drawn
    in the same order."""
    from model.lora import LoraLinear, grouped_delta
    torch.manual_seed(0)
    outs = (20, 8, 8)
    mods = tuple(LoraLinear(torch.nn.Linear(16, o, bias=False), rank=12, scale=2.0, dropout=0.3, dtype=torch.float64)
                 for o in outs)
    for m in mods:
        m.lora_A.data.normal_()
        m.lora_B.data.normal_()
        m.train(train)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(1)
    got = grouped_delta(x, mods)
    g = torch.randn_like(got)
    (got * g).sum().backward()
    grads = [(m.lora_A.grad.clone(), m.lora_B.grad.clone()) for m in mods]
    for m in mods:
        m.lora_A.grad = m.lora_B.grad = None
    torch.manual_seed(1)
    ref = []
    for m in mods:
        keep = torch.nn.functional.dropout(torch.ones_like(x), 0.3, True) if train else torch.ones_like(x)
        ref.append((x * keep) @ m.lora_A.t() @ m.lora_B.t())
    ref = torch.cat(ref, dim=-1)
    (ref * g).sum().backward()
    assert got.shape == (2, 5, sum(outs))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for m, (ga, gb) in zip(mods, grads):
        torch.testing.assert_close(ga, m.lora_A.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, m.lora_B.grad, rtol=1e-12, atol=1e-12)
    if train:  # the masks were really drawn: without dropout the product differs
        assert not torch.allclose(got, torch.cat([x @ m.lora_A.t() @ m.lora_B.t() for m in mods], -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cast_once_gives_the_same_outputs_and_follows_the_adapter(ckpt, dtype):
    """Under cast_once (sampling) every adapter group reads operands built once, and the model's outputs
    equal the ones that build them at every call, bit for bit; a later entry refreshes the same buffers
    in place after the adapter moved; training with dropout is left alone; on exit the flags are off."""
    from model.decoder import adapter_groups
    ours, x = load_model(ckpt, device="cpu").to(dtype), tokens()
    L.add_lora(ours, L.LoraConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    randomize(ours)
    ours.eval()
    groups = adapter_groups(ours)
    assert {len(g) for g in groups} == {1, 3}  # q/k/v fused; gate has no adapter, so up runs alone
    with torch.no_grad():
        want = ours(x)
        with L.disabled(ours):
            base = ours(x)
        with L.cast_once(groups, dtype):
            assert all(g[0].cast_once == len(g) for g in groups)
            assert all(not g[0].op_A.requires_grad and g[0].op_A.is_leaf for g in groups)  # no autograd history
            got = ours(x)
            saved = [g[0].op_A.clone() for g in groups]
            for g in groups:  # the forward reads the built operands: zeroed, the adapters add nothing
                g[0].op_A.zero_()
            assert torch.equal(ours(x), base)
            for g, a in zip(groups, saved):
                g[0].op_A.copy_(a)
        ptrs = [g[0].op_A.data_ptr() for g in groups]
        randomize(ours, seed=9)
        want2 = ours(x)
        with L.cast_once(groups, dtype):
            got2 = ours(x)
    assert torch.equal(got, want) and torch.equal(got2, want2) and not torch.equal(want, want2)
    assert [g[0].op_A.data_ptr() for g in groups] == ptrs  # refreshed in place: captured graphs stay valid
    assert all(m.cast_once == 0 for _, m in L.lora_modules(ours))
    ours.train()
    with L.cast_once(groups, dtype):  # dropout on: nothing is cast once
        assert all(m.cast_once == 0 for _, m in L.lora_modules(ours))
    assert "op_A" not in "".join(ours.state_dict())
