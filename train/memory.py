"""Whether a LoRA training step needs activation checkpointing: `grad_checkpointing = "auto"` compares an
estimate of the activations one step keeps for its backward with the GPU memory this process can still use.
Both ways compute the same function, but not the same bits on a GPU: a checkpointed step runs the eager
block, an unchecked one the compiled block, whose LoRA dropout masks come from inductor's own draws.
"""
from __future__ import annotations

import torch
from torch import nn

# Activations kept per layer and token, in elements of the model's dtype: 12 x hidden + 4 x intermediate.
# Calibrated on the H200 (BENCHMARKS "One CODE edit on a 7B model"): Qwen2.5-7B, LoRA r12 on 7 projections,
# 12,288 packed tokens per step peaked at 90.2 GiB with 14.7 GiB of weights and adapter (75.5 GiB kept;
# the formula gives 76.1). MARGIN and RESERVE cover what the estimate leaves out (logit chunks, the
# graph pool's scratch, the allocator's fragmentation).
HIDDEN_COPIES, INTERMEDIATE_COPIES = 12, 4
MARGIN = 1.15
RESERVE = 2 * 2**30


def activation_bytes(model: nn.Module, tokens: int) -> int:
    """Estimated bytes of activations a step over `tokens` tokens keeps for backward, without checkpointing."""
    cfg = model.config
    per_layer = HIDDEN_COPIES * cfg.hidden_size + INTERMEDIATE_COPIES * cfg.intermediate_size
    return per_layer * cfg.num_layers * tokens * model.lm_head.weight.element_size()


def usable_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on a CUDA device: free memory plus what torch's caching
    allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_setting(setting: object, where: str = "grad_checkpointing") -> None:
    """A clear error unless `setting` is True, False or "auto"; `where` names the field."""
    if not isinstance(setting, bool) and setting != "auto":
        raise ValueError(f"{where} must be true, false or 'auto', got {setting!r}")


def checkpointing(setting: bool | str, model: nn.Module, tokens: int) -> bool:
    """The checkpointing choice for steps of up to `tokens` tokens: a bool setting is kept; "auto" is on
    only on a GPU whose usable memory is below MARGIN x activation_bytes + RESERVE (off on a CPU)."""
    check_setting(setting)
    if isinstance(setting, bool):
        return setting
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return False
    return MARGIN * activation_bytes(model, tokens) + RESERVE > usable_bytes(device)
