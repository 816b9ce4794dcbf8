"""Where an SFT step's time goes on the GPU (SmolLM2-135M + LoRA r12, batch 12 x ~800 tokens)."""
import time

import torch

from model import load_model
from model.lora import LoraConfig, add_lora, lora_parameters
from train.sft import SFTConfig, sft


def main():
    model = load_model("smollm2-135m-instruct", device="cuda")
    params = add_lora(model, LoraConfig())
    g = torch.Generator().manual_seed(0)
    ex = [(torch.randint(100, 40000, (620,), generator=g).tolist(), torch.randint(100, 40000, (170,), generator=g).tolist())
          for _ in range(100)]
    for ckpt in (False,):
        cfg = SFTConfig(lr=3e-5, epochs=3, batch_size=12, stop_loss=None, grad_checkpointing=ckpt)
        torch.cuda.synchronize(); t = time.time()
        out = sft(model, ex, lora_parameters(model), cfg)
        torch.cuda.synchronize()
        print(f"ckpt={ckpt}: {out['steps']} steps in {time.time() - t:.2f} s = {(time.time() - t) / out['steps'] * 1e3:.0f} ms/step")
    cfg = SFTConfig(lr=3e-5, epochs=1, batch_size=12, stop_loss=None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        sft(model, ex, params, cfg)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
