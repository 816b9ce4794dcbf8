"""Shared pieces of the GPU benchmarks: a random-init full-size Qwen2.5-7B, hardware ceilings, timing, and
Breakdown (a run's parts timed by wrapping the functions that do them)."""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import torch

from model.config import ModelConfig
from model.decoder import Transformer

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}


def random_model(hf_cfg: dict = QWEN25_7B, *, layers: int | None = None, seed: int = 0,
                 dtype=torch.bfloat16) -> Transformer:
    """Random weights (std 0.02, norms 1) built straight on the GPU."""
    cfg = dict(hf_cfg, num_hidden_layers=layers or hf_cfg["num_hidden_layers"])
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_hf(cfg)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.reset_rope()
    model.fuse_projections()
    return model.requires_grad_(False).eval()


def hf_twin(model: Transformer, hf_cfg: dict = QWEN25_7B):
    """A transformers model sharing our weight tensors (no second copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in hf_cfg.items() if k != "architectures"}
    kw["num_hidden_layers"] = model.config.num_layers
    cfg = AutoConfig.for_model("qwen2", **kw)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=model.lm_head.weight.dtype, attn_implementation="sdpa")
    hf.load_state_dict(model.state_dict(), assign=True, strict=True)
    for mod in hf.modules():  # rotary buffers were built on meta: rebuild them on the GPU
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            inv = model.inv_freq.clone()
            mod.inv_freq = inv
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = inv
    return hf.eval()


def matmul_params(model: Transformer) -> int:
    """Parameters that cost 2 flops per token: all but the input embedding (a gather), whose tensor still
    counts when it is tied to the lm_head."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    return total if cfg.tie_word_embeddings else total - cfg.vocab_size * cfg.hidden_size


def measure_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (the HBM ceiling we compare against)."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n * 4 / sorted(times)[len(times) // 2]


def measure_matmul_flops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated()


def write_json(path: str | None, data) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"


class Breakdown:
    """Seconds and counts of each stage's parts, collected (while `on`) by wrapping the functions that do
    them; a wrapped call waits for the GPU before and after (`sync`), so its seconds are its own."""

    def __init__(self, cuda: bool):
        self.cuda, self.on, self.stage = cuda, False, "?"
        self.parts: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, object, object]] = []
        self.calls: list[tuple[str, float, object]] = []  # see `timed`'s note
        self._undo: list = []

    def _patch(self, owner, name: str, make) -> None:
        real = getattr(owner, name)
        setattr(owner, name, make(real))
        self._undo.append((owner, name, real))

    def follow_stages(self) -> None:
        """Name the parts after the editor's stage they run in."""
        from code_edit.editor import Stages

        def make(real):
            def wrapper(st, name):
                self.stage = name
                return real(st, name)
            return wrapper
        self._patch(Stages, "__call__", make)

    def _add(self, part: str, seconds: float) -> str:
        key = f"{self.stage}: {part}"
        self.parts[key + " s"] += seconds
        self.parts[key + " calls"] += 1
        return key

    def timed(self, owner, name: str, part: str, sync: bool = True, count=None, note=None) -> None:
        """`count(out)`: more numbers to sum from each call's output; `note(*args)`: what to list beside each
        call's seconds in `self.calls` (stage, seconds, note), e.g. to find the slowest."""
        def make(real):
            def wrapper(*a, **k):
                if not self.on:
                    return real(*a, **k)
                if sync and self.cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = real(*a, **k)
                if sync and self.cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t
                key = self._add(part, seconds)
                for c, v in (count(out) if count else {}).items():
                    self.parts[f"{key} {c}"] += v
                if note:
                    self.calls.append((self.stage, round(seconds, 3), note(*a, **k)))
                return out
            return wrapper
        self._patch(owner, name, make)

    def span(self, owner, start: str, end: str, part: str) -> None:
        """Seconds from a call of `start` to the return of `end` (a context manager's __enter__/__exit__)."""
        t0 = [0.0]

        def make_start(real):
            def wrapper(*a, **k):
                if self.on and self.cuda:
                    torch.cuda.synchronize()
                t0[0] = time.perf_counter()
                return real(*a, **k)
            return wrapper

        def make_end(real):
            def wrapper(*a, **k):
                out = real(*a, **k)
                if self.on:
                    if self.cuda:
                        torch.cuda.synchronize()
                    self._add(part, time.perf_counter() - t0[0])
                return out
            return wrapper
        self._patch(owner, start, make_start)
        self._patch(owner, end, make_end)

    def gpu_timed(self, owner, name: str, part: str) -> None:
        """GPU seconds of each call by CUDA events around it (no sync), summed when read."""
        def make(real):
            def wrapper(*a, **k):
                if not (self.on and self.cuda):
                    return real(*a, **k)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = real(*a, **k)
                e.record()
                self.events.append((f"{self.stage}: {part}", s, e))
                return out
            return wrapper
        self._patch(owner, name, make)

    def read(self) -> dict[str, float]:
        """The parts collected since the last read (which starts them anew)."""
        if self.cuda:
            torch.cuda.synchronize()
        for key, s, e in self.events:
            self.parts[key + " gpu s"] += s.elapsed_time(e) / 1e3
            self.parts[key + " calls"] += 1
        out = {k: round(v, 3) for k, v in sorted(self.parts.items())}
        self.parts.clear()
        self.events.clear()
        return out

    def undo(self) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)
