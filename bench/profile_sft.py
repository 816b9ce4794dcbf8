"""An SFT step on SmolLM2-135M + LoRA r12 (batch 12 x ~790 tokens): eager, compiled decoder blocks
(Transformer.compile_blocks), and compiled blocks with the step replayed from a CUDA graph (model/cuda_graph.py
GraphedStep); ms per step after warm-up, and the loss agreement between them."""
import json
import sys
import time

import torch

from model import load_model
from model.lora import LoraConfig, add_lora, lora_parameters
from train.sft import SFTConfig, sft


def timed(mode: str, ex) -> dict:
    model = load_model("smollm2-135m-instruct", device="cuda")
    add_lora(model, LoraConfig(rank=12, alpha=24, dropout=0.05, seed=3407))
    if mode == "eager":
        model.compile_blocks = lambda *a, **k: False  # keep this instance eager
    graphs = mode == "compiled+graph"
    cfg = SFTConfig(lr=3e-5, epochs=1, batch_size=12, stop_loss=None, cuda_graphs=graphs)
    t = time.perf_counter()
    first = sft(model, ex[:24], lora_parameters(model), cfg)  # warm-up: compilation (both shapes)
    warm = time.perf_counter() - t
    torch.cuda.synchronize()
    cfg = SFTConfig(lr=3e-5, epochs=3, batch_size=12, stop_loss=None, cuda_graphs=graphs)
    t = time.perf_counter()
    out = sft(model, ex, lora_parameters(model), cfg)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"mode": mode, "graph_used": out["cuda_graph"], "warmup_s": round(warm, 1), "steps": out["steps"],
            "ms_per_step": round(dt / out["steps"] * 1e3, 1), "losses": out["losses"][:5],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "first_losses": first["losses"][:2]}


def main():
    g = torch.Generator().manual_seed(0)
    ex = [(torch.randint(100, 40000, (int(n),), generator=g).tolist(), torch.randint(100, 40000, (170,), generator=g).tolist())
          for n in torch.randint(560, 660, (96,), generator=g)]
    rows = []
    for mode in ("eager", "compiled", "compiled+graph"):
        torch.cuda.reset_peak_memory_stats()
        rows.append(timed(mode, ex))
        print(json.dumps(rows[-1]), flush=True)
    # The first two steps see B = 0 (LoRA init, then lr 0 in warm-up): dropout masks cannot matter yet,
    # so all modes' losses must agree there up to bf16 rounding; later steps differ by dropout RNG.
    for r in rows[1:]:
        print(f"{r['mode']}: {rows[0]['ms_per_step'] / r['ms_per_step']:.2f}x eager; |loss diff| on the first two "
              f"steps {max(abs(a - b) for a, b in zip(rows[0]['first_losses'], r['first_losses'])):.4f}")
    if len(sys.argv) > 1:
        json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
