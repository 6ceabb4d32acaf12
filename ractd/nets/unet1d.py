"""Conditional 1D temporal U-Net with FiLM (Chi et al. 2023, "Diffusion Policy"), our implementation.

Layout (Chi et al.): Conv1d blocks (conv k=5 -> GroupNorm -> Mish); per level two residual blocks whose
middle is modulated by FiLM (scale, bias) predicted from the conditioning vector; a stride-2 conv between
levels, two mid blocks, a mirrored decoder with skip connections and transposed-conv upsampling.

Conditioning vector = concat(emb(time_1), ..., emb(time_n), global_cond). The teacher has one time input
(c_noise(sigma)); the CTM student has two (t and s) embedded by ONE shared embedding network. A student can
be warm-started from a teacher with `load_teacher_into_student`: the FiLM weights that read emb(s) start at
zero, so the student initially computes exactly the teacher's F.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ractd.config import UNetConfig


class SinusoidalEmbedding(nn.Module):
    """(batch,) scalar -> (batch, dim) sin/cos features with geometric frequencies (Transformer style)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.register_buffer("freqs", self.frequencies(dim), persistent=False)
        self.out_dtype: torch.dtype | None = None  # set by to_precision: features computed in freqs' dtype

    @staticmethod
    def frequencies(dim: int, device=None) -> torch.Tensor:
        half = dim // 2
        return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / (half - 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1)
        return emb if self.out_dtype is None else emb.to(self.out_dtype)


class Conv1dBlock(nn.Sequential):
    """Conv1d(k, same padding) -> GroupNorm -> Mish, on (batch, channels, horizon)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), nn.Mish())


class FiLMResidualBlock(nn.Module):
    """Two Conv1dBlocks; FiLM (scale * h + bias) from the conditioning after the first; 1x1 residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int, dropout: float):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond_act: torch.Tensor) -> torch.Tensor:
        """x (batch, c_in, horizon); cond_act = Mish(conditioning), computed once per U-Net call (the
        film Sequential's Mish is the same for every block, so the U-Net applies it once and each block
        uses only its Linear)."""
        return self.apply_film(x, self.film[1](cond_act))

    def apply_film(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """The block with its FiLM Linear output `film` (batch, 2 * c_out) given (fused callers compute the
        FiLM of every block in one matrix product)."""
        h = self.block1(x)
        film = film.unsqueeze(-1)
        if h.ndim == 4:  # ConditionalUnet1D.layout "nhwc": h is (batch, channels, 1, horizon)
            film = film.unsqueeze(-1)
        scale, bias = film.chunk(2, dim=1)
        h = self.block2(self.dropout(scale * h + bias))
        return h + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """F(x, times, cond): (batch, horizon, input_dim) -> (batch, horizon, input_dim).

    input_dim: per-step data width (action dim for MuJoCo, state dim for maze2d plans).
    global_cond_dim: width of the flattened conditioning vector (0 for none).
    n_times: number of scalar time inputs (1: teacher sigma; 2: CTM student t and s), sharing one embedding.
    horizon must be divisible by 2^(len(down_dims) - 1).
    """

    def __init__(self, input_dim: int, global_cond_dim: int, cfg: UNetConfig = UNetConfig(), n_times: int = 1):
        super().__init__()
        self.input_dim, self.global_cond_dim, self.n_times, self.cfg = input_dim, global_cond_dim, n_times, cfg
        E, k, g, p = cfg.time_embed_dim, cfg.kernel_size, cfg.n_groups, cfg.dropout
        self.time_embed = nn.Sequential(SinusoidalEmbedding(E), nn.Linear(E, 4 * E), nn.Mish(), nn.Linear(4 * E, E))
        cond_dim = n_times * E + global_cond_dim
        dims = [input_dim, *cfg.down_dims]
        levels = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            last = i == len(levels) - 1
            self.down.append(nn.ModuleList([
                FiLMResidualBlock(c_in, c_out, cond_dim, k, g, p),
                FiLMResidualBlock(c_out, c_out, cond_dim, k, g, p),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        mid = cfg.down_dims[-1]
        self.mid = nn.ModuleList([FiLMResidualBlock(mid, mid, cond_dim, k, g, p) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up.append(nn.ModuleList([
                FiLMResidualBlock(2 * c_out, c_in, cond_dim, k, g, p),
                FiLMResidualBlock(c_in, c_in, cond_dim, k, g, p),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
            ]))
        start = cfg.down_dims[0]
        self.final = nn.Sequential(Conv1dBlock(start, start, k, g), nn.Conv1d(start, input_dim, 1))
        self.horizon_multiple = 2 ** (len(cfg.down_dims) - 1)
        self.cond_act = nn.Mish()
        # "ncl": activations (batch, channels, horizon); "nhwc": (batch, channels, 1, horizon) in channels-last
        # memory, the convolutions as 2D ones (set by ractd.accel.set_forms with their forwards; not a weight)
        self.layout = "ncl"

    def _check(self, x: torch.Tensor, times: tuple, cond: torch.Tensor | None) -> None:
        if x.ndim != 3 or x.shape[2] != self.input_dim or x.shape[1] % self.horizon_multiple:
            raise ValueError(
                f"U-Net input must be (batch, horizon, {self.input_dim}) with horizon a multiple of "
                f"{self.horizon_multiple}; got {tuple(x.shape)}")
        if len(times) != self.n_times:
            raise ValueError(f"U-Net expects {self.n_times} time input(s), got {len(times)}")
        for t in times:
            if t.shape != (x.shape[0],):
                raise ValueError(f"U-Net time input must be (batch,) = ({x.shape[0]},); got {tuple(t.shape)}")
        if self.global_cond_dim:
            if cond is None or cond.shape != (x.shape[0], self.global_cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"U-Net conditioning must be (batch, {self.global_cond_dim}) = "
                                 f"({x.shape[0]}, {self.global_cond_dim}); got {got}")

    def forward(self, x: torch.Tensor, times: tuple[torch.Tensor, ...], cond: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs in any float dtype; a network cast to reduced precision (to_precision) computes in its
        weights' dtype and returns the input's dtype."""
        self._check(x, times, cond)
        io_dtype, dtype = x.dtype, self.final[1].weight.dtype
        if io_dtype != dtype:  # the times stay as given: the sinusoidal features are computed in float32
            x, cond = x.to(dtype), (cond.to(dtype) if cond is not None else None)
        feats = [self.time_embed(t) for t in times]
        if self.global_cond_dim:
            feats.append(cond)
        c = self.cond_act(torch.cat(feats, dim=-1))
        return self.body(x, [block.film[1](c) for block in self.film_blocks()]).to(io_dtype)

    def film_blocks(self) -> list[FiLMResidualBlock]:
        """The FiLM residual blocks in the order body() consumes their FiLM outputs."""
        blocks = [b for res1, res2, _ in self.down for b in (res1, res2)]
        blocks += list(self.mid)
        return blocks + [b for res1, res2, _ in self.up for b in (res1, res2)]

    def body(self, x: torch.Tensor, films: list[torch.Tensor]) -> torch.Tensor:
        """The U-Net on x (batch, horizon, input_dim) given each FiLM block's Linear output, in film_blocks()
        order."""
        films = iter(films)
        h = x.transpose(1, 2)  # (batch, channels, horizon)
        if self.layout == "nhwc":
            h = h.unsqueeze(2)  # x (batch, horizon, dim) contiguous: this view is channels-last already
        skips = []
        for res1, res2, downsample in self.down:
            h = res2.apply_film(res1.apply_film(h, next(films)), next(films))
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block.apply_film(h, next(films))
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2.apply_film(res1.apply_film(h, next(films)), next(films)))
        out = self.final(h)
        return (out.squeeze(2) if out.ndim == 4 else out).transpose(1, 2)


def load_teacher_into_student(student: ConditionalUnet1D, teacher: ConditionalUnet1D) -> None:
    """Warm-start a 2-time student from a 1-time teacher so the student starts as the teacher's F.

    Every weight is copied; in each FiLM Linear, the columns reading emb(s) (the second time slot) are set
    to zero, so emb(s) has no effect until training moves them.
    """
    if student.n_times != 2 or teacher.n_times != 1:
        raise ValueError("load_teacher_into_student expects a 2-time student and a 1-time teacher")
    E = teacher.cfg.time_embed_dim
    t_state = teacher.state_dict()
    new_state = {}
    for name, s_param in student.state_dict().items():
        t_param = t_state[name]
        if t_param.shape == s_param.shape:
            new_state[name] = t_param.clone()
        elif name.endswith("film.1.weight"):  # (2*c_out, E + G) -> (2*c_out, 2E + G)
            w = torch.zeros_like(s_param)
            w[:, :E] = t_param[:, :E]
            w[:, 2 * E:] = t_param[:, E:]
            new_state[name] = w
        else:
            raise ValueError(f"teacher and student differ in {name}: {tuple(t_param.shape)} vs {tuple(s_param.shape)}")
    student.load_state_dict(new_state)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- inference

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_precision(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Cast every ConditionalUnet1D / FusedUnet inside `model` (a net, Student, Denoiser, EpsModel) to `precision`
    ("fp32" | "bf16"), in place; returns model.

    Only the U-Net's weights and arithmetic change: it still takes and returns the caller's dtype (float32),
    so samplers keep their noise, scalings and clamping in float32 and a seed draws the same noise at either
    precision. The sinusoidal time features stay float32 (their arguments, 250 ln(sigma) times frequencies
    up to 1, are ~1e3: in bf16 the phase would be off by several radians). bench/bench_inference.py measures the speed; the distance between fp32 and bf16 actions is
    the behavioural cost (about 1e-2 on a random small U-Net), not a float tolerance.
    """
    if precision not in PRECISIONS:
        from ractd import RactdError

        raise RactdError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    for m in model.modules():
        if isinstance(m, (ConditionalUnet1D, FusedUnet)):
            m.to(dtype)
    for m in model.modules():
        if isinstance(m, SinusoidalEmbedding):  # sin/cos of 250 ln(sigma) ~ 1e3 need float32 arguments
            m.freqs = m.frequencies(2 * len(m.freqs), m.freqs.device)  # recomputed: m.to() rounded them
            m.out_dtype = None if dtype == torch.float32 else dtype
    return model


class FusedUnet(nn.Module):
    """The same function as a ConditionalUnet1D (up to float rounding) with fewer ops per call.

    * every time input goes through the embedding MLP in one call (rows stacked), and
    * the FiLM Linears of all residual blocks are one matrix product on Mish(conditioning), split per block.
    With `times` (a tuple of fixed network time inputs, e.g. the student's (c_noise(sigma_max),
    c_noise(sigma_min)) for one-step sampling) the time embedding is folded away: Mish is elementwise, so
    Mish(concat(emb, cond)) = concat(Mish(emb), Mish(cond)), and the FiLM product of the constant Mish(emb)
    part becomes part of the bias; forward then takes (x, cond) and the time MLP and the time columns of
    the FiLM weights are gone from the graph. Weights are copied (FiLM only) at construction: rebuild after
    changing the net's weights.
    """

    def __init__(self, net: ConditionalUnet1D, times: tuple[float, ...] | None = None):
        super().__init__()
        self.net = net
        self.input_dim, self.global_cond_dim, self.n_times = net.input_dim, net.global_cond_dim, net.n_times
        self.horizon_multiple = net.horizon_multiple
        blocks = net.film_blocks()
        weight = torch.cat([b.film[1].weight.detach() for b in blocks])
        bias = torch.cat([b.film[1].bias.detach() for b in blocks])
        self.sizes = [b.film[1].out_features for b in blocks]
        self.fixed_times = None if times is None else tuple(float(t) for t in times)
        if self.fixed_times is not None:
            if len(self.fixed_times) != net.n_times:
                raise ValueError(f"U-Net has {net.n_times} time input(s), got {len(self.fixed_times)} fixed times")
            E = net.cfg.time_embed_dim * net.n_times
            with torch.no_grad():
                t = torch.tensor(self.fixed_times, dtype=torch.float32, device=weight.device).to(weight.dtype)
                emb_act = net.cond_act(net.time_embed(t).reshape(1, E))
                bias = bias + emb_act[0] @ weight[:, :E].T
            weight = weight[:, E:]
        self.register_buffer("film_weight", weight.contiguous().clone())
        self.register_buffer("film_bias", bias.contiguous().clone())

    def _films(self, c: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
        if c is None:  # fixed times, no conditioning: every FiLM output is a constant
            return list(self.film_bias.expand(batch, -1).split(self.sizes, dim=1))
        return list(nn.functional.linear(c, self.film_weight, self.film_bias).split(self.sizes, dim=1))

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """forward(x, times, cond) like the net, or forward(x, cond) when built with fixed times."""
        net = self.net
        if self.fixed_times is None:
            times, cond = args if len(args) == 2 else (args[0], None)
            net._check(x, times, cond)
        else:
            cond = args[0] if args else None
            if net.global_cond_dim and (cond is None or cond.shape != (x.shape[0], net.global_cond_dim)):
                raise ValueError(f"U-Net conditioning must be (batch, {net.global_cond_dim})")
        io_dtype, dtype = x.dtype, self.film_weight.dtype
        x = x.to(dtype)
        cond = cond.to(dtype) if cond is not None and net.global_cond_dim else None
        if self.fixed_times is None:
            B = x.shape[0]
            emb = net.time_embed(torch.cat(list(times)))  # (n_times * B, E)
            emb = emb.reshape(self.n_times, B, -1).transpose(0, 1).reshape(B, -1)  # (B, n_times * E)
            feats = [emb] + ([cond] if cond is not None else [])
            c = net.cond_act(torch.cat(feats, dim=-1))
        else:
            c = net.cond_act(cond) if cond is not None else None
        return net.body(x, self._films(c, x.shape[0])).to(io_dtype)


class _TracedNet(nn.Module):
    """Keeps the F(x, times, cond) interface around a TorchScript graph that takes (x, *times, cond)."""

    def __init__(self, graph, like: nn.Module):
        super().__init__()
        self.graph = graph
        self.input_dim, self.global_cond_dim, self.n_times = like.input_dim, like.global_cond_dim, like.n_times
        self._like = [like]  # for shape checks, not registered as a submodule

    def forward(self, x: torch.Tensor, times: tuple[torch.Tensor, ...], cond: torch.Tensor | None = None) -> torch.Tensor:
        self._like[0]._check(x, times, cond)
        return self.graph(x, *times, cond)


class _Flat(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, *args):
        return self.net(x, tuple(args[:-1]), args[-1])


def accelerate(net: ConditionalUnet1D, mode: str = "jit", batch: int = 2, horizon: int | None = None) -> nn.Module:
    """An inference-only copy of `net` with the same interface and the same numbers up to float rounding.

    mode "jit": TorchScript trace + freeze + optimize_for_inference of FusedUnet(net) (one time-embedding
    call, one FiLM matrix product; shape-generic: any batch size).
    mode "compile": torch.compile (inductor); recompiles for every new batch size, so it suits fixed-batch
    serving rather than rollouts whose live batch shrinks. mode "none": net itself.
    bench/bench_core.py measures each mode against eager execution.
    """
    if mode == "none":
        return net
    if mode == "compile":
        return torch.compile(net.eval(), dynamic=False)
    if mode != "jit":
        raise ValueError(f"unknown acceleration mode {mode!r}; expected none, jit or compile")
    if net.global_cond_dim == 0:
        raise ValueError("jit acceleration needs a conditioned network (global_cond_dim > 0)")
    p = next(net.parameters())
    dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32  # see to_precision
    horizon = horizon or 4 * net.horizon_multiple
    x = torch.zeros(batch, horizon, net.input_dim, device=p.device, dtype=dtype)
    times = tuple(torch.ones(batch, device=p.device, dtype=dtype) for _ in range(net.n_times))
    cond = torch.zeros(batch, net.global_cond_dim, device=p.device, dtype=dtype)
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from the input checks, which _TracedNet repeats
        flat = _Flat(FusedUnet(net)).eval()
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(flat, (x, *times, cond))))
    return _TracedNet(graph, net)
