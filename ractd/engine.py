"""Batch-aware inference for the evaluation samplers: one U-Net, its sampler's fixed noise levels folded in,
run on the engine measured fastest on this machine for the live batch.

Why. A policy call is a U-Net evaluated at noise levels fixed in advance: the one-step student at (sigma_max,
sigma_min), the teacher's Heun-80 at the 80 Karras bins (158 calls per action), DDPM/DDIM at their timesteps.
Which engine runs the U-Net fastest depends on its size and on the live batch (bench/bench_inference.py and
bench/bench_engine.py measure it: an engine far ahead at batch 1 can fall behind eager at paper size and batch
100), and on the machine, so the engine is chosen by measurement, not by a fixed rule.

Folding (exact up to float rounding). ConditionalUnet1D computes every FiLM block's (scale, bias) as
W Mish(concat(emb(t_1), .., emb(t_n), cond)) + b. Mish is elementwise, so this is
(b + W_t Mish(emb(times))) + W_c Mish(cond): the first term depends only on the network's time inputs, which a
sampler takes from a fixed table, so it is computed once per table entry (`FoldedUnet.bias_for`); the second
depends only on the conditioning, which is the same for all of a sampler call's network calls, so it is
computed once per action (`FoldedUnet.prepare`). What is left per network call is the convolutional body
(ConditionalUnet1D.body) given the FiLM outputs, and that is what the engines run:

    eager      net.body in torch (the FiLM and time MLP work above already removed)
    jit        the body traced, frozen and optimized for inference by TorchScript
    gemm       the body with every convolution as one matrix product (ractd.nets.gemm: im2col), weights stored
               once (fp32, exact up to summation order)
    layers     the body with each convolution and Mish in the form measured fastest for it at the bucket's batch
               (ractd.engine_layers): torch's, im2col, or Winograd's F(4, 5) (ractd.nets.winograd: 2.5x fewer
               multiply-adds for the kernel-5 convolutions), Mish from one exp; built per bucket, its forms kept in
               the bucket's calibration record; fp32 only (exact up to float rounding)
    openvino   the body exported to ONNX in memory and compiled by OpenVINO, LATENCY hint, fp32 precision hint;
               a dynamic-batch model, plus a static-shape one for a batch size that keeps coming back (_OpenVINO)
    openvino-2s  the same compiled for 2 streams (THROUGHPUT hint; threads >= 2): the batch split in two halves
               run concurrently (rows are independent: GroupNorm normalizes each sample)
    *-bf16     with EngineConfig.precision "bf16" only: gemm with bf16 weights and products (fast on CPUs with
               AMX) / OpenVINO's bf16 precision hint / torch autocast (eager-bf16: only when asked for by name,
               it was the slowest wherever bench/bench_engine.py ran). Not exact: a behavioural cost, measured on
               100-seed scores (ractd_repro.studies.bf16_scores; docs/engines.md)

Choice (`EngineSelector`). The live batch B is rounded up to a power of two (its bucket); the first time a bucket is
met, every candidate runs on random inputs of the batch that met it (after warm-up calls: TorchScript re-specializes on
its first calls at a new shape), taking turns for at least two rounds (each keeps its best and its worst round), its
output checked against eager's; a candidate more than 1.25x eager's time after the first round is out of the later
rounds. The fastest candidate whose *slowest* round took at most `margin` x eager's *fastest* is chosen, otherwise
eager: an engine is never chosen over eager unless it was measured faster by more than the rounds' own spread. A record
measured while the machine was busy (load average >= its CPUs) is measured again the first time the bucket is met on a
quieter machine, and so is one measured without a candidate of today (an engine added since, a new install). The
result is cached per (network shape, bucket, threads, precision, CPU, library versions) in
<cache_dir>/engines/calibration.json (ractd.engine_records: written atomically; an unreadable file is ignored with a
warning and rewritten), so a machine measures each shape once (rounds: ractd.timing.seconds_per_call). Calibrations and
builds run inside ractd.timing.setup: a rollout's time per action leaves them out.

The library samplers (edm.sample_heun / sample_euler, ddpm.sample_ddpm / sample_ddim, ctm.sample_student) run
unchanged: `FastDenoiser`, `FastEpsModel` and `FastStudent` are drop-in replacements for the models' `bind(cond)`
(the student's: an object called like the Student) that look up each call's noise level in their table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import torch
from torch import nn

from ractd import RactdError, edm
from ractd.engine_records import (  # noqa: F401 -- write_calibration: the cache's writer, used through ractd.engine
    calibration_path,
    load_now,
    machine,
    measure_again,
    read_calibration,
    store_record,
    write_calibration,
)
from ractd.engine_runs import (  # noqa: F401 -- _ov, STATIC_AFTER: read through ractd.engine by the tests
    STATIC_AFTER,
    _eager,
    _gemm,
    _glue_threads,
    _jit,
    _OpenVINO,
    _ov,
)
from ractd.engine_layers import layered_copy, measure_layers
from ractd.timing import seconds_per_call, setup

log = logging.getLogger(__name__)

ENGINES = ("eager", "jit", "gemm", "layers", "openvino", "openvino-2s")
ENGINE_CHOICES = ("auto", "none", "eager", "jit", "gemm", "layers", "openvino")
PER_BUCKET = ("layers",)   # engines built for one bucket: their forms were measured at its batch
PRECISIONS = ("fp32", "bf16", "auto")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an evaluation sampler runs its U-Net.

    engine: auto (the fastest measured for each live batch bucket; see the module doc) | eager | jit | gemm |
        layers | openvino (that engine for every batch, folded; jit and layers run fp32 at any precision) | none
        (the library models called as they are: no folding).
    precision: fp32 | bf16 | auto (bf16 where the CPU multiplies bf16 matrices in hardware -- AMX-BF16 --, else
        fp32; `resolve_precision`). bf16 engines: gemm-bf16 / OpenVINO bf16; a behavioural cost, not a rounding
        difference, measured on 100-seed scores by ractd_repro.studies.bf16_scores (docs/results.md).
    threads: intra-op threads of the engines (0 = torch.get_num_threads(), what the caller owns).
    calibrate_s: seconds each candidate runs per calibration round (at least one call).
    rounds: calibration rounds (the candidates take turns; each keeps its best and worst round); at least 2 run,
        exactly 2 when one eager call takes a second or more.
    margin: a candidate replaces eager only if its slowest round is <= margin x eager's fastest.
    cache: read and write the calibration cache (<cache_dir>/engines/calibration.json).
    """

    engine: str = "auto"
    precision: str = "auto"
    threads: int = 0
    calibrate_s: float = 0.15
    rounds: int = 3
    margin: float = 0.95
    cache: bool = True

    def resolved(self) -> "EngineConfig":
        """This config with precision auto replaced by what it means on this CPU."""
        return dataclasses.replace(self, precision=resolve_precision(self.precision))

    def validate(self) -> "EngineConfig":
        if self.engine not in ENGINE_CHOICES:
            raise RactdError(f"engine={self.engine!r}: expected one of {', '.join(ENGINE_CHOICES)}")
        if self.precision not in PRECISIONS:
            raise RactdError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.threads < 0 or self.calibrate_s <= 0 or self.rounds < 1 or not 0 < self.margin <= 1:
            raise RactdError("engine threads must be >= 0, calibrate_s > 0, rounds >= 1 and 0 < margin <= 1")
        return self

    def n_threads(self) -> int:
        return int(self.threads) or torch.get_num_threads()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BF16_SAMPLERS = ("student", "heun", "euler")   # unchanged at bf16 on 100 seeds (ractd_repro.studies.bf16_scores)


def resolve_precision(precision: str, sampler: str = "student") -> str:
    """fp32 / bf16 as given; auto: bf16 on a CPU with AMX-BF16 (bf16 matrix products in hardware: the gemm-bf16
    and OpenVINO bf16 engines run 2-4x faster than fp32 there) for the samplers measured at bf16 (BF16_SAMPLERS),
    fp32 elsewhere (without AMX, bf16 is emulated or converted and gains little) and for DDPM / DDIM (not measured
    at bf16; DDIM's x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar) turns bf16's rounding into changes of up to 1.3 in
    an action chunk at abar ~ 0: bench/bench_engine.py)."""
    if precision != "auto":
        return precision
    return "bf16" if sampler in BF16_SAMPLERS and "amx_bf16" in cpu_flags() else "fp32"


def bucket(batch: int) -> int:
    """The calibration bucket of a live batch: the smallest power of two >= batch."""
    return 1 << max(0, int(batch) - 1).bit_length()


# ---------------------------------------------------------------------------------------------- folding

class _Body(nn.Module):
    """(x (B, H, D), films (B, F)) -> net.body(x, films split per FiLM block): what the engines run."""

    def __init__(self, net, sizes: list[int]):
        super().__init__()
        self.net, self.sizes = net, list(sizes)

    def forward(self, x: torch.Tensor, films: torch.Tensor) -> torch.Tensor:
        return self.net.body(x, list(films.split(self.sizes, dim=1)))


class FoldedUnet:
    """A ConditionalUnet1D with its FiLM time terms folded per time table entry (see the module doc) and its body
    run by the engine chosen for the live batch.

    net: a float32 ConditionalUnet1D (not an accelerated copy). horizon: the sampler's horizon.
    Weights are copied (FiLM only) here: build a new one after changing the net's weights.
    """

    def __init__(self, net: nn.Module, horizon: int, cfg: EngineConfig = EngineConfig()):
        from ractd.nets.unet1d import ConditionalUnet1D

        if not isinstance(net, ConditionalUnet1D):
            raise RactdError(f"engine {cfg.engine!r} needs a ConditionalUnet1D, got {type(net).__name__}")
        if net.final[1].weight.dtype != torch.float32:
            raise RactdError("the engines take a float32 U-Net; set EngineConfig.precision for bf16")
        self.net, self.horizon, self.cfg = net.eval(), int(horizon), cfg.validate().resolved()
        blocks = net.film_blocks()
        weight = torch.cat([b.film[1].weight.detach() for b in blocks])
        self._bias0 = torch.cat([b.film[1].bias.detach() for b in blocks])
        self.sizes = [b.film[1].out_features for b in blocks]
        self.E = net.n_times * net.cfg.time_embed_dim
        self._w_time = weight[:, :self.E].contiguous()
        self._w_cond = weight[:, self.E:].contiguous()
        self._biases: dict[tuple[float, ...], torch.Tensor] = {}
        self.selector = EngineSelector(self, self.cfg)

    @property
    def width(self) -> int:
        """F: the total FiLM output width (all blocks' 2 * channels)."""
        return sum(self.sizes)

    def bias_for(self, times: tuple[float, ...]) -> torch.Tensor:
        """(F,) b + W_t Mish(concat(emb(t_1), .., emb(t_n))) for network time inputs `times` (cached)."""
        key = tuple(float(t) for t in times)
        b = self._biases.get(key)
        if b is None:
            if len(key) != self.net.n_times:
                raise ValueError(f"U-Net has {self.net.n_times} time input(s), got {len(key)}")
            with torch.inference_mode():
                emb = self.net.time_embed(torch.tensor(key, dtype=torch.float32)).reshape(1, self.E)
                b = self._bias0 + self.net.cond_act(emb)[0] @ self._w_time.T
            self._biases[key] = b
        return b

    def cond_films(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, F) W_c Mish(cond): the conditioning's share of every FiLM output (zeros without conditioning)."""
        if self.net.global_cond_dim == 0:
            return torch.zeros(batch, self.width)
        if cond is None or cond.shape != (batch, self.net.global_cond_dim):
            raise ValueError(f"U-Net conditioning must be (batch, {self.net.global_cond_dim}) = "
                             f"({batch}, {self.net.global_cond_dim}); got {None if cond is None else tuple(cond.shape)}")
        with torch.inference_mode():
            return nn.functional.linear(self.net.cond_act(cond.float()), self._w_cond)

    def prepare(self, cond: torch.Tensor | None, batch: int) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
        """call(x, times) -> F(x, times, cond) for a batch of `batch` rows sharing this conditioning: the
        conditioning's FiLM share is computed here once and the engine is picked for this batch."""
        run = self.selector.engine_for(batch)
        glue = _glue_threads(run)
        with glue():
            cf = self.cond_films(cond, batch)

        def call(x: torch.Tensor, times: tuple) -> torch.Tensor:
            with glue():
                films = cf + self.bias_for(times)
            return run(x, films)

        return call


# ---------------------------------------------------------------------------------------------- engines

def candidates(cfg: EngineConfig, threads: int) -> list[str]:
    """The engines `auto` measures: eager (fp32: the reference) always; jit; gemm; layers (fp32 only: its forms are
    fp32); openvino when installed (2 streams with >= 2 threads); with precision bf16 the bf16 variants of gemm and openvino instead of the fp32
    engines (not eager-bf16, torch autocast: the slowest everywhere bench/bench_engine.py measured)."""
    names = ["eager", "jit", "gemm", "layers"]
    if _ov() is not None:
        names.append("openvino")
        if threads >= 2:
            names.append("openvino-2s")
    if resolve_precision(cfg.precision) == "bf16":
        names = ["eager"] + [f"{n}-bf16" for n in names if n not in ("eager", "jit", "layers")]
    return names


# ---------------------------------------------------------------------------------------------- choice


class EngineSelector:
    """The engine of each live-batch bucket for one FoldedUnet (see the module doc)."""

    def __init__(self, folded: FoldedUnet, cfg: EngineConfig):
        self.folded, self.cfg = folded, cfg
        self.threads = cfg.n_threads()
        self._built: dict[str, Callable] = {}
        self._by_bucket: dict[int, str] = {}
        self.measured: dict[int, dict] = {}   # bucket -> the calibration record used (tests and the bench read it)
        self.layer_choice: dict[int, dict[str, str]] = {}   # bucket -> the layers engine's forms (ractd.engine_layers)
        self.layer_records: dict[int, list[dict]] = {}      # bucket -> their measurements, where measured here
        net = folded.net
        self.shape_key = (f"in{net.input_dim}-h{folded.horizon}-c{net.global_cond_dim}-t{net.n_times}"
                          f"-E{net.cfg.time_embed_dim}-d{'x'.join(map(str, net.cfg.down_dims))}"
                          f"-k{net.cfg.kernel_size}-g{net.cfg.n_groups}")

    def key(self, b: int) -> str:
        return f"{self.shape_key}|b{b}|th{self.threads}|{self.cfg.precision}|{machine(_ov())}"

    def build(self, name: str, b: int = 1, batch: int | None = None) -> Callable:
        """The engine `name`'s run(x, films) (built once; an engine of PER_BUCKET once per bucket b, its layers'
        forms from the bucket's calibration record or measured at `batch` rows)."""
        key = self._key(name, b)
        if key not in self._built:
            with setup():  # a first call's build is set-up, not the call's time (ractd.timing)
                if name in PER_BUCKET:
                    self._build_layers(b, batch or b)
                else:
                    self._build(name)
        return self._built[key]

    @staticmethod
    def _key(name: str, b: int) -> str:
        return f"{name}@b{b}" if name in PER_BUCKET else name

    def _build_layers(self, b: int, batch: int) -> None:
        f = self.folded
        body = _Body(f.net, f.sizes).eval()
        layers = (self.measured.get(b) or {}).get("layers")
        if layers is None:
            gen = torch.Generator().manual_seed(1)
            example = (torch.randn(batch, f.horizon, f.net.input_dim, generator=gen),
                       torch.randn(batch, f.width, generator=gen))
            layers, records = measure_layers(body, example, max(2, self.cfg.rounds), self.cfg.calibrate_s / 3,
                                             self.cfg.margin)
            self.layer_records[b] = records
        self.layer_choice[b] = layers
        self._built[self._key("layers", b)] = _eager(layered_copy(body, layers))

    def _build(self, name: str) -> None:
        f = self.folded
        body = _Body(f.net, f.sizes).eval()
        example = (torch.zeros(2, f.horizon, f.net.input_dim), torch.zeros(2, f.width))
        base, bf16 = name.removesuffix("-bf16"), name.endswith("-bf16")
        precision = "bf16" if bf16 else "fp32"
        t0 = time.perf_counter()
        if base == "eager":
            self._built[name] = _eager(body, autocast=bf16)
        elif base == "jit":
            self._built[name] = _jit(body, example)
        elif base == "gemm":
            self._built[name] = _gemm(body, torch.bfloat16 if bf16 else torch.float32)
        elif base in ("openvino", "openvino-2s"):
            self._built[name] = _OpenVINO(body, example, self.threads, precision,
                                          streams=2 if base == "openvino-2s" else 1)
        else:
            raise RactdError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
        log.info("engine %s built for %s in %.2f s", name, self.shape_key, time.perf_counter() - t0)

    def engine_for(self, batch: int) -> Callable:
        return self.build(self.choice(batch), bucket(batch), batch)

    def choice(self, batch: int) -> str:
        """The engine's name for a live batch: fixed by cfg.engine, else the bucket's calibrated choice."""
        if self.cfg.engine not in ("auto", "none"):
            name = self.cfg.engine
            return f"{name}-bf16" if self.cfg.precision == "bf16" and name not in ("jit", "layers") else name
        b = bucket(batch)
        if b not in self._by_bucket:
            with setup():  # a new bucket's calibration is set-up, not the call's time (ractd.timing)
                record = self._cached(b) or self.calibrate(b, batch)
            self._by_bucket[b], self.measured[b] = record["choice"], record
            # the candidates that lost are dropped: at paper size each holds a copy of the weights (OpenVINO's
            # compiled models, TorchScript's frozen graph, gemm's matrices; a bench process reached 23 GB)
            keep = {"eager", *(self._key(name, b) for b, name in self._by_bucket.items())}
            self._built = {k: v for k, v in self._built.items() if k in keep}
        return self._by_bucket[b]

    def _cached(self, b: int) -> dict | None:
        if not self.cfg.cache:
            return None
        record = read_calibration(calibration_path()).get(self.key(b))
        names = set(candidates(self.cfg, self.threads))
        if not isinstance(record, dict) or record.get("choice") not in names:
            return None  # absent, or made with an engine not installed here
        if measure_again(record):
            return None  # measured on a busy machine (load >= CPUs): measured again now that it is quieter
        if names - set(record.get("candidates", record.get("ms", {}))):
            return None  # measured before a candidate of today existed (a new engine, a new install)
        return record

    def calibrate(self, b: int, batch: int | None = None) -> dict:
        """Time every candidate for bucket b at `batch` rows (default b; the selector passes the live batch that
        first met the bucket), interleaved rounds, best kept, and choose (see the module doc)."""
        f = self.folded
        n = int(batch or b)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, f.horizon, f.net.input_dim, generator=gen)
        films = f.bias_for((0.0,) * f.net.n_times) + 0.1 * torch.randn(n, f.width, generator=gen)
        t0 = time.perf_counter()
        ref = self.build("eager")(x, films)
        # a call of a second or more (paper size, large batch): two rounds of one call (the spread still measured)
        rounds = max(2, self.cfg.rounds) if time.perf_counter() - t0 < 1.0 else 2
        tol = (2e-1 if self.cfg.precision == "bf16" else 1e-3) * (1.0 + float(ref.abs().max()))
        runs, diffs = {}, {}
        for name in candidates(self.cfg, self.threads):
            if "-2s" in name and n < 2:
                continue  # two streams split the batch: one row runs on one of them, a slower openvino
            try:
                run = self.build(name, b, n)
                if isinstance(run, _OpenVINO) and run.streams == 1:
                    run._static_request(n, now=True)  # timed as it runs once the batch repeats
                diffs[name] = float((run(x, films) - ref).abs().max())   # also its warm-up call
                if name.startswith("jit"):
                    run(x, films)   # TorchScript's profiling executor optimizes on its second call
            except Exception as e:  # an engine that cannot build or run this net is not a candidate
                log.warning("engine %s unavailable for %s: %s", name, self.shape_key,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            if not diffs[name] <= tol:
                log.warning("engine %s differs from eager by %.2e (> %.1e) for %s; not used", name, diffs[name],
                            tol, self.shape_key)
                continue
            runs[name] = run
        best, worst = seconds_per_call({name: (lambda run=run: run(x, films)) for name, run in runs.items()},
                                       rounds, self.cfg.calibrate_s, drop_above=PRUNE_ABOVE)
        choice = choose(best, self.cfg.margin, worst)
        record = {"choice": choice, "candidates": sorted(candidates(self.cfg, self.threads)),
                  "ms": {k: round(v * 1e3, 4) for k, v in best.items()},
                  "worst_ms": {k: round(v * 1e3, 4) for k, v in worst.items()}, "rounds": rounds,
                  "max_abs_diff": diffs, "bucket": b, "batch": n, "threads": self.threads,
                  "load": load_now(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if b in self.layer_choice:
            record["layers"] = self.layer_choice[b]
        log.info("engine for %s at batch %d (bucket %d), %d threads: %s (ms per call: %s)", self.shape_key, n, b,
                 self.threads, choice, record["ms"])
        if self.cfg.cache:
            store_record(calibration_path(), self.key(b), record, "engine calibration")
        return record


PRUNE_ABOVE = 1.25   # a candidate this much slower than eager after the first round runs no further rounds



def choose(seconds: dict[str, float], margin: float, worst: dict[str, float] | None = None) -> str:
    """The fastest engine whose slowest measured round (its only time when `worst` is not given) is <= margin x
    eager's fastest; eager when none is (or eager alone ran)."""
    eager = seconds["eager"]
    worst = worst or seconds
    fast = {k: v for k, v in seconds.items() if k != "eager" and worst.get(k, v) <= margin * eager}
    return min(fast, key=fast.get) if fast else "eager"


# ---------------------------------------------------------------------------------------------- samplers' models

class FastDenoiser:
    """teacher.bind(cond) for edm.sample_heun / sample_euler with the engines: D(x, sigma) = c_skip x +
    c_out F(c_in x, c_noise(sigma), cond), the scalings and the FiLM time term cached per sigma.

    sigmas: the sampler's schedule (its levels are precomputed; any other sigma is computed on first use)."""

    def __init__(self, teacher: edm.Denoiser, horizon: int, sigmas: torch.Tensor | None = None,
                 cfg: EngineConfig = EngineConfig()):
        self.teacher, self.folded = teacher, FoldedUnet(teacher.net, horizon, cfg)
        self._consts: dict[float, tuple] = {}
        for s in ([] if sigmas is None else sigmas.tolist()):
            self._levels(s)

    def _levels(self, sigma: float) -> tuple:
        c = self._consts.get(sigma)
        if c is None:
            t = self.teacher
            sig = torch.tensor([sigma], dtype=torch.float32)
            c_skip, c_out, c_in = (v.reshape(()) for v in edm.scalings(sig, t.scalings, t.sigma_data, t.sigma_min))
            c = self._consts[sigma] = (c_skip, c_out, c_in, (float(edm.c_noise(sig)),))
            self.folded.bias_for(c[3])
        return c

    def bind(self, cond: torch.Tensor | None):
        """denoise(x, sigma) with sigma a scalar or a (batch,) tensor of one value (as the samplers pass it)."""
        calls: dict[int, Callable] = {}

        def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
            s = torch.as_tensor(sigma).reshape(-1)
            if len(s) > 1 and not bool((s == s[0]).all()):
                return self.teacher(x, s, cond)   # per-row levels (not the samplers' case): the library path
            c_skip, c_out, c_in, times = self._levels(float(s[0]))
            call = calls.get(x.shape[0])
            if call is None:
                call = calls[x.shape[0]] = self.folded.prepare(cond, x.shape[0])
            return c_skip * x + c_out * call(c_in * x, times)

        return denoise


class FastEpsModel:
    """model.bind(cond) for ddpm.sample_ddpm / sample_ddim with the engines (eps = net(x, (t,), cond))."""

    def __init__(self, model, horizon: int, cfg: EngineConfig = EngineConfig()):
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, "ddpm"))
        self.model, self.folded = model, FoldedUnet(model.net, horizon, cfg)
        for t in range(model.T):
            self.folded.bias_for((float(t),))
        self.alphas_cumprod = model.alphas_cumprod

    def bind(self, cond: torch.Tensor | None):
        calls: dict[int, Callable] = {}

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if len(t) > 1 and not bool((t == t[0]).all()):
                return self.model(x, t, cond)
            call = calls.get(x.shape[0])
            if call is None:
                call = calls[x.shape[0]] = self.folded.prepare(cond, x.shape[0])
            return call(x, (float(t[0]),))

        return eps


class FastStudent:
    """The CTM student for ctm.sample_student with the engines: `bind(cond)` gives an object called like the
    Student, G(x, t, s) = (s/t) x + (1 - s/t) (c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s), cond)),
    its constants and FiLM time term cached per (t, s)."""

    def __init__(self, student, horizon: int, pairs: Sequence[tuple[float, float]] = (),
                 cfg: EngineConfig = EngineConfig()):
        self.student, self.folded = student, FoldedUnet(student.net, horizon, cfg)
        self.sigma_min = student.sigma_min
        self._consts: dict[tuple[float, float], tuple] = {}
        for t, s in pairs:
            self._levels(t, s)

    def _levels(self, t: float, s: float) -> tuple:
        key = (float(t), float(s))
        c = self._consts.get(key)
        if c is None:
            st = self.student
            tt, ss = torch.tensor([t], dtype=torch.float32), torch.tensor([s], dtype=torch.float32)
            c_skip, c_out, c_in = (v.reshape(()) for v in edm.scalings(tt, st.scalings, st.sigma_data, st.sigma_min))
            ratio = (ss / tt).reshape(())
            c = self._consts[key] = (ratio, c_skip, c_out, c_in,
                                     (float(edm.c_noise(tt)), float(edm.c_noise(ss))))
            self.folded.bias_for(c[4])
        return c

    def bind(self, cond: torch.Tensor | None):
        return _BoundStudent(self, cond)


class _BoundStudent:
    def __init__(self, fast: FastStudent, cond):
        self.fast, self.cond, self.sigma_min = fast, cond, fast.sigma_min
        self._calls: dict[int, Callable] = {}

    def __call__(self, x: torch.Tensor, t, s, cond=None) -> torch.Tensor:
        if not (isinstance(t, (int, float)) and isinstance(s, (int, float))):
            return self.fast.student(x, t, s, self.cond)  # tensor times (not sample_student's case)
        ratio, c_skip, c_out, c_in, times = self.fast._levels(t, s)
        call = self._calls.get(x.shape[0])
        if call is None:
            call = self._calls[x.shape[0]] = self.fast.folded.prepare(self.cond, x.shape[0])
        g = c_skip * x + c_out * call(c_in * x, times)
        return ratio * x + (1 - ratio) * g
