"""Run in a child process with TRITON_INTERPRET=1 by test_decode_attention.py (Triton picks interpreted
or compiled kernels when they are defined, so the parent's process cannot switch): prints JSON."""
import json
import math
import sys

import torch

from model import generate, load_model
from model.config import ModelConfig
from model.decode_attention import decode_attention, usable
from model.decoder import Block


def reference(q, k, v, mask, prefix):
    """Plain softmax attention over [prefix | own] keys, every row and query head, in float64."""
    B, kv, g, D = q.shape
    K, V = k.double(), v.double()
    if prefix is not None:
        K = torch.cat([prefix[0].double()[None].expand(B, -1, -1, -1), K], 2)
        V = torch.cat([prefix[1].double()[None].expand(B, -1, -1, -1), V], 2)
    w = (q.double() @ K.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
    return w @ V


def kernel_errors() -> dict:
    """Max |kernel - reference| per case: strided cache views, g not a power of two, rows that see no
    prefix or no own slot, long fully masked stretches, prefix blocks no row of a tile sees (the kernel
    skips them), rows of one prefix tile that see different slots, and more rows than one tile."""
    g_ = torch.Generator().manual_seed(0)
    out = {}
    cases = {"own only": (3, 2, 3, 64, 70, 0), "prefix": (5, 2, 7, 16, 40, 200), "one row": (1, 4, 1, 32, 129, 0),
             "prefix, two row tiles": (30, 1, 3, 32, 20, 100),  # 64 // 3 = 21 rows per prefix tile
             "two prompts' prefixes": (8, 1, 16, 16, 10, 300)}  # 4 rows per tile: blocks a tile never sees
    for name, (B, kv, g, D, S, L) in cases.items():
        q = torch.randn(B, kv, g, D, generator=g_)
        k, v = (torch.randn(B + 1, kv, S + 5, D, generator=g_)[:B, :, :S] for _ in range(2))
        prefix = None
        if L:
            prefix = tuple(torch.randn(1, kv, L + 9, D, generator=g_)[0, :, :L] for _ in range(2))
        valid = torch.rand(B, L + S + 3, generator=g_) < 0.4
        valid[:, L + S - 1] = True
        if L:
            valid[0, :L] = False  # row 0 sees no prefix
            valid[1, L:] = False  # row 1 sees no own slot ...
            valid[1, L - 1] = True
            valid[2, : L - 3] = False  # row 2: a long masked stretch, then three slots
        if name == "two prompts' prefixes":  # generate's layout: each row sees its own prompt's part only
            valid[:, :L] = False
            valid[: B // 2, : L // 2] = True
            valid[B // 2:, L // 2: L] = True
        mask = valid[:, None, None, : L + S]
        out[name] = (decode_attention(q, k, v, mask, prefix).double() - reference(q, k, v, mask, prefix)).abs().max().item()
    # The op's own write: the new token goes into slot S - 1 of a cache with spare slots beyond S.
    B, kv, g, D, S, L = 3, 2, 2, 16, 20, 8
    q, kn, vn = torch.randn(B, kv, g, D, generator=g_), torch.randn(B, kv, 1, D, generator=g_), torch.randn(B, kv, 1, D, generator=g_)
    k, v = torch.randn(B, kv, S + 6, D, generator=g_), torch.randn(B, kv, S + 6, D, generator=g_)
    prefix = tuple(torch.randn(kv, L, D, generator=g_) for _ in range(2))
    mask = (torch.rand(B, L + S, generator=g_) < 0.5)[:, None, None]
    mask[..., -1] = True
    k0, v0 = k.clone(), v.clone()
    got = decode_attention(q, k, v, mask, prefix, (kn, vn, torch.tensor([S - 1])))
    k0[:, :, S - 1:S], v0[:, :, S - 1:S] = kn, vn
    out["writes the new token"] = max((got.double() - reference(q, k0[:, :, :S], v0[:, :, :S], mask, prefix)).abs().max().item(),
                                      (k - k0).abs().max().item(), (v - v0).abs().max().item())
    out["usable"] = usable(torch.zeros(1, 1, 1, 16))
    return out


def compiled_step() -> dict:
    """One decoder block compiled for a decode step over a strided cache (rows of a larger buffer, a prefix
    that is a view): the caches the op receives (graph inputs, or copies inductor made of them), its
    difference from the eager block, and the slot it wrote."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    blk = Block(cfg).eval()
    B, S, L = 4, 30, 12
    caches = [torch.randn(B + 2, 2, S + 10, 16)[:B] for _ in range(2)]
    prefix = [torch.randn(2, L + 4, 16)[:, :L] for _ in range(2)]
    x, cos, sin = torch.randn(B, 1, 64), torch.randn(B, 1, 1, 16), torch.randn(B, 1, 1, 16)
    mask = torch.rand(B, 1, 1, L + S) < 0.7
    mask[..., -1] = True
    idx = torch.tensor([S - 1])
    eager = [c.clone() for c in caches]
    with torch.no_grad():
        want = blk(x, cos, sin, mask, (*eager, *prefix), idx)
        got, codes = run_and_get_code(torch.compile(blk, dynamic=True), x, cos, sin, mask, (*caches, *prefix), idx)
    call = next(line for c in codes for line in c.splitlines() if "code_edit.decode_attention.default(" in line)
    args = call.split("default(", 1)[1].split(", ")
    return {"cache args": args[1:3], "max diff": (got - want).abs().max().item(),
            "cache diff": max((a - b).abs().max().item() for a, b in zip(caches, eager))}


def main(model_dir: str) -> None:
    m = load_model(model_dir, device="cpu")
    prompts = [[5, 9, 11, 3, 40], [7] * 17, [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    runs = [generate(m, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=3, stop_ids=[], seed=4),
            generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])]
    print(json.dumps({"errors": kernel_errors(), "compiled": compiled_step(),
                      "runs": [[(c.tokens, c.logprobs) for c in r] for r in runs]}))


if __name__ == "__main__":
    main(sys.argv[1])
