"""Export a trained one-step student as ONE self-contained file (ONNX or TorchScript) and run it.

    python -m ractd.export --checkpoint runs/T/student/best.pt --format onnx [--out policy.onnx]

The file holds the whole policy, and runs without ractd (ONNX: onnxruntime or OpenVINO and numpy;
TorchScript: torch.jit.load):

    inputs   obs    (B, k, obs_dim) float32, raw states in dataset units
             noise  (B, horizon, dim) float32, standard normal (the caller draws it: x_T is an input)
    output   out    (B, horizon, dim) float32, in dataset units

    cond = normalize(obs).reshape(B, k * obs_dim)            (the checkpoint's obs normalizer, per state)
    x_T  = sigma_max * noise   if the checkpoint's distill.init_scaled, else noise
    out  = unnormalize(clamp(G(x_T, sigma_max, sigma_min, cond), -1, 1))

Locomotion: k = obs_history, the last k states oldest first (at an episode start the first state repeated,
as ractd.policy.LocomotionPolicy pads), and out is the action chunk; execute out[:, 0] and replan every
step. Maze2d: k = 2, obs = [start state, goal state [gx, gy, 0, 0]] in D4RL coordinates, and out is the
planned state sequence, tracked by ractd.policy.MazePlanner.track. A JSON description (task, kind, shapes,
init_scaled, sigmas, precision) is stored in the file: ONNX metadata_props["ractd"], TorchScript extra file
"ractd.json".

The graph is ractd.ctm.Student's one-step jump with its constant times folded away
(ractd.nets.unet1d.FusedUnet with fixed times): the time embedding is a constant, so its FiLM contribution is
part of the FiLM bias, and all FiLM Linears are one matrix product. Same numbers as the PyTorch policy up to
float rounding (tests/test_export.py: within 1e-4 on the same noise).

Engines (ExportedPolicy). ONNX runs on OpenVINO or ONNX Runtime (`engine`, default "auto" = OpenVINO when
installed); TorchScript runs on torch. bench/bench_inference.py measures them: where it ran, OpenVINO was the
fastest for the small U-Net and at paper size batch 1, but at paper size batch 100 it was slower than eager
torch and the TorchScript file was best, so both formats are kept.
Precision. "fp32" (default) or "bf16": OpenVINO runs an ONNX file in bf16 with INFERENCE_PRECISION_HINT (ONNX
Runtime has no bf16 CPU kernels for these ops: an error); a TorchScript file is bf16 when exported with
--precision bf16 (U-Net weights in bf16, inputs and outputs float32). `--precision` at export is stored as
the file's default; ExportedPolicy(precision=...) overrides it for ONNX. OpenVINO is always given an
explicit precision hint, since on CPUs with native bf16 its default is bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ractd import RactdError
from ractd.errors import Parser, run_command

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
ENGINES = ("auto", "openvino", "onnxruntime", "torch")
PRECISION_CHOICES = ("fp32", "bf16")
META_KEY = "ractd"
ONNX_OPSET = 18


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """One export (`python -m ractd.export`; the flags are generated from these fields).

    checkpoint: a one-step student checkpoint (stage "student").
    format: onnx | torchscript.
    out: the file to write ("" = the checkpoint's path with suffix .onnx / .ts).
    precision: fp32 | bf16 (TorchScript: the U-Net's weights; ONNX: the file's default runtime precision).
    """

    checkpoint: str = ""
    format: str = "onnx"
    out: str = ""
    precision: str = "fp32"

    def validate(self) -> "ExportConfig":
        if not self.checkpoint:
            raise RactdError("--checkpoint is required")
        if self.format not in FORMATS:
            raise RactdError(f"format={self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.precision not in PRECISION_CHOICES:
            raise RactdError(f"precision={self.precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
        return self

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoint).with_suffix(SUFFIX[self.format])


# ---------------------------------------------------------------------------------------------- the graph

def _policy_graph_class():
    import torch
    from torch import nn

    from ractd import edm
    from ractd.nets.unet1d import ConditionalUnet1D, FusedUnet

    class PolicyGraph(nn.Module):
        """obs (B, k, obs_dim), noise (B, horizon, dim) -> out (B, horizon, dim); see the module doc."""

        def __init__(self, student, obs_normalizer, out_normalizer, init_scaled: bool,
                     sigma_max: float = edm.SIGMA_MAX):
            super().__init__()
            if not isinstance(student.net, ConditionalUnet1D):
                raise RactdError(f"export needs the student's ConditionalUnet1D, got {type(student.net).__name__}")
            f32 = torch.float32
            t = torch.tensor([sigma_max], dtype=f32)
            s = torch.tensor([student.sigma_min], dtype=f32)
            c_skip, c_out, c_in = edm.boundary_scalings(t, student.sigma_data, student.sigma_min)
            self.unet = FusedUnet(student.net, (float(edm.c_noise(t)), float(edm.c_noise(s))))
            self.init_scaled, self.sigma_max = bool(init_scaled), float(sigma_max)
            consts = {"ratio": s / t, "c_skip": c_skip, "c_out": c_out, "c_in": c_in,
                      "obs_scale": obs_normalizer.scale, "obs_offset": obs_normalizer.offset,
                      "out_scale": out_normalizer.scale, "out_offset": out_normalizer.offset}
            for name, v in consts.items():
                self.register_buffer(name, torch.as_tensor(np.asarray(v, np.float64)).to(f32).reshape(-1))

        def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            cond = (obs * self.obs_scale + self.obs_offset).reshape(obs.shape[0], -1)
            x = noise * self.sigma_max if self.init_scaled else noise
            g = self.c_skip * x + self.c_out * self.unet(self.c_in * x, cond)      # Student.g at (sigma_max, sigma_min)
            y = (self.ratio * x + (1 - self.ratio) * g).clamp(-1.0, 1.0)           # Student.forward, clamped
            return (y - self.out_offset) / self.out_scale

    return PolicyGraph


def build_policy_graph(student, obs_normalizer, out_normalizer, init_scaled: bool = True):
    """The policy as one torch module (see the module doc): a Student (its ConditionalUnet1D, not an
    accelerated copy), the obs normalizer and the output normalizer (actions, or states for maze2d)."""
    return _policy_graph_class()(student, obs_normalizer, out_normalizer, init_scaled).eval()


def export_graph(graph, meta: dict, path, fmt: str = "onnx", precision: str = "fp32") -> Path:
    """Write `graph` (build_policy_graph) with its description `meta` to `path` atomically; returns the path.

    meta needs k, obs_dim, horizon, dim (the input shapes); precision "bf16" makes a TorchScript file's U-Net
    bf16 and is an ONNX file's default runtime precision."""
    import copy

    import torch

    from ractd.io import atomic_write
    from ractd.nets.unet1d import to_precision

    if fmt not in FORMATS:
        raise RactdError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if precision not in PRECISION_CHOICES:
        raise RactdError(f"precision={precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    meta = {**meta, "format": fmt, "precision": precision, "inputs": ["obs", "noise"], "outputs": ["out"]}
    obs = torch.zeros(2, meta["k"], meta["obs_dim"])
    noise = torch.zeros(2, meta["horizon"], meta["dim"])
    path = Path(path)
    if fmt == "torchscript":
        if precision != "fp32":
            graph = copy.deepcopy(graph)
            to_precision(graph, precision)
        import warnings

        with warnings.catch_warnings(), torch.no_grad(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # TracerWarnings from FusedUnet's input check
            module = torch.jit.freeze(torch.jit.trace(graph.eval(), (obs, noise), check_trace=False))
        buf = io.BytesIO()
        torch.jit.save(module, buf, _extra_files={f"{META_KEY}.json": json.dumps(meta)})
        return atomic_write(path, buf.getvalue())
    return atomic_write(path, _onnx_bytes(graph, obs, noise, meta))


def _onnx_bytes(graph, obs, noise, meta) -> bytes:
    """The ONNX model with its metadata. TorchScript-based exporter (dynamo=False): 2 s for a small net
    where the dynamo exporter took 10-16 s, and a plain opset-18 graph both engines run."""
    import warnings

    import torch

    try:
        import onnx
    except ImportError:
        raise RactdError("ONNX export needs the onnx package: pip install -e '.[deploy]'") from None
    buf = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), (obs, noise), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["obs", "noise"], output_names=["out"],
                          dynamic_axes={"obs": batch, "noise": batch, "out": batch})
    model = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    if model.ByteSize() >= 2**31:
        raise RactdError("the network is over 2 GB, more than one ONNX file can hold; use --format torchscript")
    return model.SerializeToString()


def export_checkpoint(checkpoint, out="", fmt: str = "onnx", precision: str = "fp32",
                      init_scaled: bool | None = None) -> Path:
    """Export a one-step student checkpoint (see the module doc); returns the written file.

    init_scaled: None = the checkpoint's distill.init_scaled (the start noise it was trained with)."""
    from ractd import __version__
    from ractd.data.windows import Normalizer
    from ractd.tasks import get_task
    from ractd.train import load_stage_model

    cfg0 = ExportConfig(checkpoint=str(checkpoint), format=fmt, out=str(out or ""), precision=precision).validate()
    model, cfg, ck = load_stage_model(Path(checkpoint))
    if cfg.stage != "student":
        raise RactdError(f"export needs a student checkpoint; {checkpoint} is a {cfg.stage}")
    task = get_task(cfg.task)
    norms = {k: Normalizer.from_state_dict(v) for k, v in ck["normalizers"].items()}
    horizon, dim = (int(v) for v in ck["shapes"]["x"])
    locomotion = task.kind == "locomotion"
    k = int(cfg.obs_history) if locomotion else 2
    init_scaled = cfg.distill.init_scaled if init_scaled is None else bool(init_scaled)
    graph = build_policy_graph(model, norms["obs"], norms["action"] if locomotion else norms["obs"], init_scaled)
    meta = {"task": task.name, "kind": task.kind, "k": k, "obs_dim": norms["obs"].dim, "horizon": horizon,
            "dim": dim, "init_scaled": init_scaled, "sigma_max": graph.sigma_max, "sigma_min": model.sigma_min,
            "checkpoint": str(checkpoint), "ractd_version": __version__}
    path = export_graph(graph, meta, cfg0.out_path(), fmt, precision)
    log.info("exported %s -> %s (%s, %s)", checkpoint, path, fmt, precision)
    return path


# ---------------------------------------------------------------------------------------------- runtime

class ExportedPolicy:
    """Runs an exported policy file: act(obs, noise) -> out (see the module doc).

    engine: "auto" (ONNX: OpenVINO if installed, else ONNX Runtime; TorchScript: torch), "openvino",
    "onnxruntime" or "torch". precision: None (the file's) | "fp32" | "bf16". threads: the engine's intra-op
    threads (None = the engine's default; set it to the CPUs you own, as for torch).
    `rollout_policy()` gives an object ractd.rollout.rollout_locomotion / rollout_maze accept.
    """

    def __init__(self, path, engine: str = "auto", precision: str | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise RactdError(f"exported policy not found: {self.path}")
        if engine not in ENGINES:
            raise RactdError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        if precision is not None and precision not in PRECISION_CHOICES:
            raise RactdError(f"precision={precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
        self.threads = threads
        if self.path.suffix == ".onnx" or _is_onnx(self.path):
            self.meta = _onnx_meta(self.path)
            self.precision = precision or self.meta.get("precision", "fp32")
            self.engine = _pick_onnx_engine(engine)
            self._run = (_openvino_runner if self.engine == "openvino" else _ort_runner)(
                self.path, self.precision, threads)
        else:
            if engine not in ("auto", "torch"):
                raise RactdError(f"a TorchScript file runs on torch, not {engine}")
            self.engine = "torch"
            self._run, self.meta = _torch_runner(self.path, threads)
            self.precision = self.meta.get("precision", "fp32")
            if precision is not None and precision != self.precision:
                raise RactdError(f"{self.path} is a {self.precision} TorchScript file; export it again with "
                                 f"--precision {precision}")
        self.k, self.obs_dim = int(self.meta["k"]), int(self.meta["obs_dim"])
        self.horizon, self.dim = int(self.meta["horizon"]), int(self.meta["dim"])

    def act(self, obs, noise) -> np.ndarray:
        """obs (B, k, obs_dim) (or (B, obs_dim) when k = 1), noise (B, horizon, dim) -> (B, horizon, dim)."""
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim == 2 and self.k == 1:
            obs = obs[:, None, :]
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        if obs.shape[1:] != (self.k, self.obs_dim) or noise.shape != (len(obs), self.horizon, self.dim):
            raise RactdError(f"act expects obs (B, {self.k}, {self.obs_dim}) and noise (B, {self.horizon}, "
                             f"{self.dim}); got {obs.shape} and {noise.shape}")
        if len(obs) == 0:
            return np.zeros((0, self.horizon, self.dim), np.float32)
        return self._run(obs, noise)

    def rollout_policy(self):
        """A ractd.policy.LocomotionPolicy (locomotion) or MazePlanner (maze2d) running this file: per-row
        noise from the rows' generators exactly as the PyTorch samplers draw it."""
        return (_ExportedLocomotion if self.meta["kind"] == "locomotion" else _ExportedMaze)(self)


def policy_from_export(path, engine: str = "auto", precision: str | None = None, threads: int | None = None):
    """(policy or planner, task) for an exported file: what ractd.evaluate needs to roll it out."""
    from ractd.tasks import get_task

    exported = ExportedPolicy(path, engine, precision, threads)
    return exported.rollout_policy(), get_task(exported.meta["task"])


def _is_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) != b"PK"  # TorchScript files are zip archives


def _onnx_meta(path: Path) -> dict:
    try:
        import onnx
    except ImportError:
        raise RactdError("reading an ONNX policy needs the onnx package: pip install -e '.[deploy]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RactdError(f"cannot read ONNX file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise RactdError(f"{path} is not a ractd policy export (no '{META_KEY}' metadata)")
    return json.loads(props[META_KEY])


def _pick_onnx_engine(engine: str) -> str:
    import importlib.util

    if engine == "torch":
        raise RactdError("an ONNX file runs on openvino or onnxruntime, not torch")
    if engine == "auto":
        for name, module in (("openvino", "openvino"), ("onnxruntime", "onnxruntime")):
            if importlib.util.find_spec(module) is not None:
                return name
        raise RactdError("no ONNX engine installed: pip install -e '.[deploy]' (openvino, onnxruntime)")
    if importlib.util.find_spec(engine) is None:
        raise RactdError(f"engine {engine} is not installed: pip install -e '.[deploy]'")
    return engine


def _openvino_runner(path: Path, precision: str, threads: int | None):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(obs, noise):
        return np.array(request.infer({"obs": obs, "noise": noise})[0], dtype=np.float32, copy=True)

    return run


def _ort_runner(path: Path, precision: str, threads: int | None):
    import onnxruntime as ort

    if precision != "fp32":
        raise RactdError("onnxruntime runs this policy in fp32 only; use engine openvino for bf16")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(obs, noise):
        return session.run(None, {"obs": obs, "noise": noise})[0]

    return run


def _torch_runner(path: Path, threads: int | None):
    import torch

    extra = {f"{META_KEY}.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise RactdError(f"cannot read TorchScript file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not extra[f"{META_KEY}.json"]:
        raise RactdError(f"{path} is not a ractd policy export (no {META_KEY}.json inside)")
    meta = json.loads(extra[f"{META_KEY}.json"])
    if threads:
        torch.set_num_threads(int(threads))  # process-global in torch

    def run(obs, noise):
        with torch.inference_mode():
            return module(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()

    return run, meta


def _row_noise(generators: Sequence, horizon: int, dim: int) -> np.ndarray:
    from ractd.policy import rowwise_randn

    return rowwise_randn(generators, (horizon, dim)).numpy()


class _ExportedLocomotion:
    """LocomotionPolicy's interface (reset, act_chunk, act) over an ExportedPolicy; the same per-env state
    histories (ractd.policy.LocomotionPolicy keeps them; this reuses its bookkeeping)."""

    def __init__(self, exported: ExportedPolicy):
        from ractd.policy import LocomotionPolicy

        self.exported = exported
        self._inner = LocomotionPolicy(None, _Dim(exported.obs_dim), None, obs_history=exported.k)

    def reset(self, n: int) -> None:
        self._inner.reset(n)

    def act_chunk(self, obs: np.ndarray, generators, active_mask: np.ndarray | None = None) -> np.ndarray:
        inner, ex = self._inner, self.exported
        if inner._hist is None:
            raise RuntimeError("call reset(n) before act()")
        obs = np.asarray(obs)
        n = len(inner._hist)
        if obs.shape != (n, ex.obs_dim) or len(generators) != n:
            raise ValueError(f"act expects obs ({n}, {ex.obs_dim}) and {n} generators; got {obs.shape} and "
                             f"{len(generators)}")
        rows = np.arange(n) if active_mask is None else np.flatnonzero(np.asarray(active_mask, bool))
        inner._push(obs, rows)
        chunk = ex.act(inner._hist[rows], _row_noise([generators[i] for i in rows], ex.horizon, ex.dim))
        out = np.full((n, ex.horizon, ex.dim), np.nan, dtype=np.float32)
        out[rows] = chunk
        return out

    def act(self, obs: np.ndarray, generators, active_mask: np.ndarray | None = None) -> np.ndarray:
        return self.act_chunk(obs, generators, active_mask)[:, 0]


class _ExportedMaze:
    """MazePlanner's interface (plan, track) over an ExportedPolicy."""

    def __init__(self, exported: ExportedPolicy):
        self.exported, self.horizon = exported, exported.horizon

    def plan(self, start_obs: np.ndarray, goal_xy: np.ndarray, generators) -> np.ndarray:
        start = np.asarray(start_obs, dtype=np.float32)
        goal = np.zeros_like(start)
        goal[:, :2] = np.asarray(goal_xy, dtype=np.float32)
        ex = self.exported
        return ex.act(np.stack([start, goal], axis=1), _row_noise(generators, ex.horizon, ex.dim))

    @staticmethod
    def track(plan, obs, t):
        from ractd.policy import MazePlanner

        return MazePlanner.track(plan, obs, t)


class _Dim:
    """The one attribute LocomotionPolicy's history bookkeeping reads from its obs normalizer."""

    def __init__(self, dim: int):
        self.dim = dim


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = ExportConfig()
    ap = Parser(prog="python -m ractd.export", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a one-step student checkpoint (stage student)")
    ap.add_argument("--format", default=d.format, choices=FORMATS, help=f"file format (default {d.format})")
    ap.add_argument("--out", default=d.out, help="output file (default: the checkpoint's path with suffix "
                    + " / ".join(SUFFIX.values()) + ")")
    ap.add_argument("--precision", default=d.precision, choices=PRECISION_CHOICES,
                    help=f"TorchScript: U-Net weights; ONNX: the file's default runtime precision (default {d.precision})")
    ap.add_argument("--unscaled-init", action="store_true",
                    help="x_T = noise instead of sigma_max * noise (default: what the checkpoint was trained with)")
    ap.add_argument("--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body() -> None:
        print(export_checkpoint(args.checkpoint, args.out, args.format, args.precision,
                                init_scaled=False if args.unscaled_init else None))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
