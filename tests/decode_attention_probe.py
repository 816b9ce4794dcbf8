"""Run in a child process with TRITON_INTERPRET=1 by test_decode_attention.py (Triton picks interpreted
or compiled kernels when they are defined, so the parent's process cannot switch): prints JSON."""
import json
import math
import sys

import torch

from model import generate, load_model
from model.decode_attention import decode_attention, usable


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
    prefix or no own slot, long fully masked stretches (blocks the kernel skips), rows of one prefix tile
    that see different slots, and more rows than one tile."""
    g_ = torch.Generator().manual_seed(0)
    out = {}
    cases = {"own only": (3, 2, 3, 64, 70, 0), "prefix": (5, 2, 7, 16, 40, 200), "one row": (1, 4, 1, 32, 129, 0),
             "prefix, two row tiles": (30, 1, 3, 32, 20, 100)}  # 64 // 3 = 21 rows per prefix tile
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
        mask = valid[:, None, None, : L + S]
        out[name] = (decode_attention(q, k, v, mask, prefix).double() - reference(q, k, v, mask, prefix)).abs().max().item()
    out["usable"] = usable(torch.zeros(1, 1, 1, 16))
    return out


def main(model_dir: str) -> None:
    m = load_model(model_dir, device="cpu")
    prompts = [[5, 9, 11, 3, 40], [7] * 17, [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    runs = [generate(m, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=3, stop_ids=[], seed=4),
            generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])]
    print(json.dumps({"errors": kernel_errors(),
                      "runs": [[(c.tokens, c.logprobs) for c in r] for r in runs]}))


if __name__ == "__main__":
    main(sys.argv[1])
