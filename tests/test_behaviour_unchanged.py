"""The refactor guard of issue S1: a tiny-preset CausalEdit run and a LoRA run on the hand-built cases give
exactly the metrics.json (timings aside) that the code gave before the restructuring
(tests/data/behaviour_tiny.json, written by this file's `capture` on 2026-12-03, one CPU thread; rewritten
the same day when SFT's result gained "graphs", "graphed_steps", "shapes", "positions" and "padding", with
every other value checked unchanged against the first record; rewritten again when the sampler's noise
became counter-based (model/generate.py race_noise): only sampled values moved, the SFT losses and padding
and the distillation losses, while every greedy and count value stayed); rewritten on 2026-12-04 when SFT
batches became packed rows: SFT positions and padding (now 0) moved, and losses in their 6th digit
(other matmul shapes), nothing else; rewritten later that day when a layer's adapters became grouped
products (model/lora.py grouped_delta): two distillation losses moved in their 8th digit, nothing else;
and when SFT's result gained "grad_checkpointing": four keys added, every value unchanged)."""
import json
import sys
from pathlib import Path

import torch

from code_edit.__main__ import main
from test_editor_fixtures import cli_args

EXPECTED = Path(__file__).parent / "data" / "behaviour_tiny.json"
TIMING = {"time", "seconds", "generate_s", "teacher_s", "student_s", "peak_gpu_mem_bytes"}


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def capture(tmp: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for method in ("CausalEdit", "LoRA"):
            d = tmp / method
            d.mkdir(parents=True, exist_ok=True)
            assert main(cli_args(d, method, "--run_id", "b", max_cases=2)) == 0
            (m,) = d.glob("out/**/metrics.json")
            out[method] = strip(json.loads(m.read_text()))
        return json.loads(json.dumps(out, sort_keys=True))
    finally:
        torch.set_num_threads(threads)


def test_metrics_equal_the_recorded_ones(tmp_path):
    assert capture(tmp_path) == json.loads(EXPECTED.read_text())


if __name__ == "__main__":  # python tests/test_behaviour_unchanged.py: record the expected output anew
    import tempfile
    sys.path.insert(0, str(Path(__file__).parent))
    EXPECTED.write_text(json.dumps(capture(Path(tempfile.mkdtemp())), indent=1, sort_keys=True))
