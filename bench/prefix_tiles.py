"""Tile sweep of the decode-attention op's shared-prefix kernel (model/decode_attention.py: PREFIX_LINES,
PREFIX_STAGES, PREFIX_WARPS, PREFIX_SLOTS) at the middle step of rollout cases (c) and (d), where the
op costs what it costs on average over a call. Each variant's output is checked against the torch form.
`--rollout CASES` then sets the fastest variant (the sum of both shapes) and runs rollout.py's cases.

GPU:  cd bench && PYTHONPATH=.. python prefix_tiles.py [--rollout cd]
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from check_gpu import attention_case
from model import decode_attention as DA
from model.decode_attention import decode_attention
from model.decoder import _attend_decode
from rollout import _us

NAMES = ("PREFIX_LINES", "PREFIX_STAGES", "PREFIX_WARPS", "PREFIX_SLOTS")
SHAPES = {"c mid-step: 256 rows, prefix 4 x 512, 256 own": ((256, 4, 7, 128, 2048, 256), 4),
          "d mid-step: 1,200 rows, prefix 640, 448 own": ((1200, 4, 7, 128, 640, 448), 1)}


def variants() -> list[tuple[int, int, int, int]]:
    grid = [(lines, stages, warps, 128) for lines, stages, warps in itertools.product((32, 64, 128), (1, 2, 3), (4, 8))]
    return grid + [(lines, stages, 4, 64) for lines, stages in itertools.product((64, 128), (2, 3))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollout", default="", help="rollout.py cases to run with the fastest variant, e.g. cd")
    args = ap.parse_args()
    default = tuple(getattr(DA, n) for n in NAMES)
    cases = {name: attention_case(*shape, torch.bfloat16, prompts=n_p, ragged=False)
             for name, (shape, n_p) in SHAPES.items()}
    refs = {name: _attend_decode(*c) for name, c in cases.items()}
    results = []
    for var in [default] + [v for v in variants() if v != default]:
        for n, t in zip(NAMES, var):
            setattr(DA, n, t)
        us, err = [], 0.0
        for name, c in cases.items():
            err = max(err, float((decode_attention(*c).float() - refs[name].float()).abs().max()))
            us.append(_us(decode_attention, *c))
        results.append((sum(us), var, us, err))
        print(f"  lines {var[0]:3d} stages {var[1]} warps {var[2]} slots {var[3]:3d}: "
              + ", ".join(f"{u:6.0f} us" for u in us) + f"  max|d| vs torch form {err:.1e}"
              + ("  (the default)" if var == default else ""), flush=True)
    ok = [r for r in results if r[3] <= 2 * results[0][3] + 1e-2]
    best = min(ok)
    print(f"fastest {dict(zip(NAMES, best[1]))}: {best[0]:.0f} us against the default's {results[0][0]:.0f} us "
          f"({results[0][0] / best[0]:.2f}x); shapes: {list(SHAPES)}", flush=True)
    if args.rollout:
        for n, t in zip(NAMES, best[1]):
            setattr(DA, n, t)
        import rollout
        sys.argv = ["rollout.py", "--cases", args.rollout, "--skip-hf"]
        rollout.main()


if __name__ == "__main__":
    main()
