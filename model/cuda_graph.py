"""One CUDA-graph capture routine for the decode step (model/generate.py) and the SFT step (train/sft.py):
warm up on a side stream, capture once, then replay with new inputs copied into the static buffers."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class GraphedStep:
    """`fn` (fixed-shape tensor inputs -> outputs) captured in a CUDA graph and replayed: for small models a
    step is hundreds of small kernels whose launches cost more than their work. Inputs are copied into
    static buffers; the outputs are static too, each replay overwriting them. Warm-up runs on a side
    stream first (compilation, cuBLAS workspaces), as the PyTorch CUDA-graphs notes prescribe. `params`:
    parameters whose gradients `fn` computes; warm-up leaves them None, so at capture the backward assigns
    them rather than accumulating, and each replay overwrites the same .grad tensors. `pool`: a memory
    pool shared with other graphs (torch.cuda.graph_pool_handle())."""

    def __init__(self, fn: Callable, example: Sequence[torch.Tensor], *, params: Sequence[nn.Parameter] = (),
                 warmup: int = 2, pool: object = None):
        self.inputs = tuple(t.clone() for t in example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
                for p in params:
                    p.grad = None
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.outputs
