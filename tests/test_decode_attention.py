"""The Triton decode-attention kernel (model/decode_attention.py), run in Triton's interpreter on CPU:
against float64 softmax attention, and inside generate() against the torch form the CPU otherwise uses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from hf_tiny import make_hf_model  # noqa: E402
from model import generate, load_model  # noqa: E402
from model.decode_attention import usable  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    make_hf_model("llama3", path)  # head_dim 16: the kernel's smallest
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    res = subprocess.run([sys.executable, str(HERE / "decode_attention_probe.py"), str(path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), path


def test_kernel_equals_float64_attention(probe):
    out, _ = probe
    errs = out["errors"]
    assert errs.pop("usable") is True
    assert set(errs) == {"own only", "prefix", "one row", "prefix, two row tiles", "two prompts' prefixes",
                         "writes the new token"}
    for name, err in errs.items():
        assert err < 2e-6, (name, err)


def test_a_compiled_step_hands_the_op_the_caches_themselves(probe):
    """Inductor passes the strided cache views to the op as the graph's inputs (arg..), not as copies
    (buf..) of the whole window made every step; the compiled block equals the eager one, cache included."""
    c = probe[0]["compiled"]
    assert all(a.startswith("arg") for a in c["cache args"]), c["cache args"]
    assert c["max diff"] < 1e-5 and c["cache diff"] < 1e-5, c


def test_generate_through_the_kernel_equals_the_torch_form(probe):
    """Same seed, same tokens; log-probs equal up to fp32 rounding (the kernel sums in another order)."""
    out, path = probe
    m = load_model(path, device="cpu")
    assert not usable(torch.zeros(1, 1, 1, 16))  # this process: the torch form
    prompts = [[5, 9, 11, 3, 40], [7] * 17, [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    runs = [generate(m, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=3, stop_ids=[], seed=4),
            generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])]
    for want, got in zip(runs, out["runs"]):
        assert len(want) == len(got)
        for c, (toks, lps) in zip(want, got):
            assert c.tokens == toks
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-5)
