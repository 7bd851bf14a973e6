"""The static step captured once in a CUDA graph and replayed: one launch per token instead of one per kernel.

The capture plan, per batch size (``_capture``): two warm-up runs of the step on a side stream (the
first compiles it with ``compile=True``: timed as ``compile_seconds``; the second lets the allocator
and the kernels settle), then one capture, ``torch.cuda.graph``, which records the kernels without
running them (timed as ``capture_seconds``). Replays then read the inputs from the same buffers
(``StaticState``), which is why the step reads its slot, positions and mask from tensors. This follows
the PyTorch CUDA semantics notes (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs: work on a
capturing stream is recorded, not run; warm up on a side stream first) and ``torch.cuda.graph``'s docs;
gpt-fast gets the same from ``torch.compile(decode_one_token, mode="reduce-overhead")`` (``generate.py``).

The step neither advances the slot nor the positions (``decode_one_token`` does, after the replay), so
a warm-up run at any moment computes exactly what the next replay computes: capturing is safe even
while rows are being decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .static import StaticGenerator, StaticState

_clock = time.perf_counter  # a test swaps in a fake clock


class CudaGraphs:
    """The CUDA calls the capture plan makes. A test swaps in a fake with the same methods to check the
    plan (what runs, how often, what is timed) on a machine without a GPU."""

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def run_on_side_stream(self, device: torch.device, fn: Callable[[], object]) -> None:
        self._require(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def capture(self, device: torch.device, fn: Callable[[], torch.Tensor]):
        """(graph, output buffer): the kernels of ``fn`` recorded, not run; ``graph.replay()`` runs them."""
        self._require(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    def synchronize(self, device: torch.device) -> None:
        if torch.device(device).type == "cuda":  # nothing runs asynchronously elsewhere
            torch.cuda.synchronize(device)

    def _require(self, device: torch.device) -> None:
        if not self.available(torch.device(device)):
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}"
                             + ("" if torch.cuda.is_available() else " (this torch sees no CUDA device)"))


class GraphedStaticGenerator(StaticGenerator):
    """``StaticGenerator`` whose decode step is captured once per batch size in a CUDA graph, then replayed.

    ``compile=True`` compiles the static step first (fused kernels, then captured). The capture happens in
    ``warmup()`` (``generate`` calls it with its own sizes) or at the first decode step of a new batch size.
    """

    static, cuda_graph = True, True
    graphs = CudaGraphs()

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None):
        super().__init__(model, compile=compile, max_seq_len=max_seq_len)
        if not self.graphs.available(self.device):
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}: use StaticGenerator "
                             f"(or FastGenerator(cuda_graph=True), which warns and falls back to it)")
        self._warm = False  # capture in warmup(), sized for the first call

    def _warm_up(self, ids: torch.Tensor) -> None:
        self._begin(ids, None, 1)  # a dummy prompt: the buffers hold a real state to warm up on
        self._capture(self.state)

    def _capture(self, st: StaticState) -> None:
        """Warm up twice on a side stream (the first run compiles), then capture: each cost timed apart."""
        def step():
            return self._step(st.token, st.slot, st.rope_pos, st.slot_mask)

        g = self.graphs
        t0 = _clock()
        g.run_on_side_stream(self.device, step)  # compiles (compile=True), picks kernels
        g.synchronize(self.device)
        t1 = _clock()
        if self.compiled:
            self.compile_seconds += t1 - t0
        g.run_on_side_stream(self.device, step)  # steady state: what the capture will record
        st.graph, st.logits = g.capture(self.device, step)  # (B, V) logits buffer, rewritten by each replay
        g.synchronize(self.device)
        self.capture_seconds += _clock() - t1 + (0.0 if self.compiled else t1 - t0)

    def _run_step(self, st: StaticState) -> torch.Tensor:
        if st.graph is None:
            self._capture(st)
        st.graph.replay()  # the whole step, one launch; reads token/slot/rope_pos/slot_mask
        return st.logits
