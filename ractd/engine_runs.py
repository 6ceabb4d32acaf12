"""The engines' run functions for ractd.engine (eager, gemm, TorchScript, OpenVINO), each
run(x (B, H, D), films (B, F)) -> (B, H, D) on a folded U-Net body, and the thread context of the torch work around
an engine call. ractd.engine builds, calibrates and chooses them (its module doc)."""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from ractd import RactdError

def _ov():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


@contextlib.contextmanager
def _one_torch_thread():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _glue_threads(run: Callable) -> Callable:
    """The thread context of the torch work around an engine call: one torch thread when the engine is OpenVINO
    (its own thread pool). torch's OpenMP threads spin for a while after a parallel region (the FiLM product and
    sum at batch 100 are parallel ones) and took the cores from OpenVINO's threads: with 2 threads the small
    student's batch-100 call measured 18-20 ms against 13-15 ms for the OpenVINO call alone, 14-16 ms with the
    glue on one thread (bench/bench_engine.py's fp32 / bf16 cells)."""
    return _one_torch_thread if isinstance(run, _OpenVINO) else contextlib.nullcontext


def _eager(body: nn.Module, autocast: bool = False):
    def run(x, films):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return body(x, films).float()
    return run


def _gemm(body: nn.Module, dtype: torch.dtype):
    from ractd.nets.gemm import gemm_copy

    module = gemm_copy(body, dtype)

    def run(x, films):
        with torch.inference_mode():
            return module(x, films)
    return run


def _jit(body: nn.Module, example: tuple):
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(body.eval(), example)))

    def run(x, films):
        with torch.inference_mode():
            return graph(x, films)
    return run


STATIC_AFTER = 16         # calls at one batch size after which OpenVINO gets a static-shape model for it
STATIC_MAX_BYTES = 2**30  # ... while the U-Net's weights times the static models kept stay under this
STATIC_MAX = 8            # ... and at most this many


class _OpenVINO:
    """The body exported to ONNX (in memory) and compiled by OpenVINO for CPU, called run(x, films).

    The ONNX route, not openvino.convert_model of the torch module: its graph measured slower than eager where the
    ONNX route was faster (small U-Net, batch 100, 1 thread). Batch shapes: a dynamic-batch model serves every
    batch; a batch size met STATIC_AFTER times (Heun's 158 calls of one action, a rollout whose live batch holds)
    gets its own static-shape model, which measured faster than the dynamic one (a few of them, while their
    weights stay under STATIC_MAX_BYTES). streams 2: THROUGHPUT hint, two requests each
    running half of the batch concurrently.
    """

    def __init__(self, body: nn.Module, example: tuple, threads: int, precision: str, streams: int = 1):
        import io
        import warnings

        ov = _ov()
        if ov is None:
            raise RactdError("engine openvino is not installed: pip install -e '.[deploy]'")
        buf = io.BytesIO()
        batch = {0: "batch"}
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(body.eval(), example, buf, dynamo=False, opset_version=18, input_names=["x", "films"],
                              output_names=["out"], dynamic_axes={"x": batch, "films": batch, "out": batch})
        self.onnx, self.core, self.streams = buf.getvalue(), ov.Core(), int(streams)
        self.config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                       "INFERENCE_NUM_THREADS": int(threads)}
        if streams == 1:
            self.config["PERFORMANCE_HINT"] = "LATENCY"
        else:
            self.config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(streams)})
        compiled = self.core.compile_model(self.core.read_model(self.onnx), "CPU", self.config)
        self.requests = [compiled.create_infer_request() for _ in range(streams)]
        weight_bytes = sum(p.numel() * p.element_size() for p in body.parameters())
        self.max_static = 0 if streams > 1 else min(STATIC_MAX, int(STATIC_MAX_BYTES // max(weight_bytes, 1)) - 1)
        self.static: dict[int, object] = {}   # batch -> infer request of its static-shape model
        self.seen: dict[int, int] = {}

    def _static_request(self, n: int, now: bool = False):
        req = self.static.get(n)
        if req is None and len(self.static) < self.max_static:
            self.seen[n] = self.seen.get(n, 0) + 1
            if self.seen[n] >= STATIC_AFTER or now:
                model = self.core.read_model(self.onnx)
                model.reshape({model.inputs[0]: [n, *model.inputs[0].get_partial_shape()[1:].to_shape()],
                               model.inputs[1]: [n, model.inputs[1].get_partial_shape()[1].get_length()]})
                req = self.static[n] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return req

    def __call__(self, x: torch.Tensor, films: torch.Tensor) -> torch.Tensor:
        x, films = x.detach().float().contiguous().numpy(), films.detach().float().contiguous().numpy()
        if self.streams == 1 or len(x) < 2:
            req = self._static_request(len(x)) or self.requests[0]
            return torch.from_numpy(req.infer([x, films])[0].copy())
        cuts = [round(i * len(x) / self.streams) for i in range(self.streams + 1)]
        for r, a, b in zip(self.requests, cuts[:-1], cuts[1:]):
            r.start_async([x[a:b], films[a:b]])
        for r in self.requests:
            r.wait()
        return torch.from_numpy(np.concatenate([r.get_output_tensor(0).data for r in self.requests]))
