"""Reward model network R_psi(s, a): a residual MLP with Mish (paper Table 8, Janner et al. 2022 style)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """concat(action, state) -> scalar normalized return-to-go.

    hidden_dims: layer widths; paper Table 8 lists (32, 64, 128, 256), the released code uses (64, 128, 256).
    Each hidden layer is h' = Mish(Linear(h)) + P(h), with P the identity where widths match and a linear
    projection otherwise. bounded=True squashes the output with tanh into (-1, 1), the range of the
    normalized target: an unbounded model extrapolates wildly outside the data (REFERENCE.md calibration).

    Shapes: state (batch, obs_dim), action (batch, act_dim) -> (batch,).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims=(32, 64, 128, 256), bounded: bool = False):
        super().__init__()
        self.obs_dim, self.act_dim, self.bounded = obs_dim, act_dim, bounded
        dims = [obs_dim + act_dim, *hidden_dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.skips = nn.ModuleList(nn.Identity() if a == b else nn.Linear(a, b, bias=False)
                                   for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.Mish()
        self.head = nn.Linear(dims[-1], 1)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if state.ndim != 2 or state.shape[1] != self.obs_dim:
            raise ValueError(f"reward model state must be (batch, {self.obs_dim}); got {tuple(state.shape)}")
        if action.shape != (state.shape[0], self.act_dim):
            raise ValueError(f"reward model action must be ({state.shape[0]}, {self.act_dim}); got {tuple(action.shape)}")
        h = torch.cat([action, state], dim=-1)
        for layer, skip in zip(self.layers, self.skips):
            h = self.act(layer(h)) + skip(h)
        out = self.head(h).squeeze(-1)
        return torch.tanh(out) if self.bounded else out


class MLPNet(nn.Module):
    """A small MLP with the U-Net's interface F(x, times, cond), for toy problems and fast tests.

    x: (batch, horizon, input_dim) is flattened; each time input goes through one shared sinusoidal
    embedding + MLP (as in the U-Net); the features are concat(x, emb(t_1), ..., emb(t_n), cond).
    """

    def __init__(self, input_dim: int, horizon: int, global_cond_dim: int = 0, hidden: int = 256,
                 depth: int = 3, time_embed_dim: int = 32, n_times: int = 1):
        super().__init__()
        from ractd.nets.unet1d import SinusoidalEmbedding

        self.input_dim, self.horizon, self.global_cond_dim, self.n_times = input_dim, horizon, global_cond_dim, n_times
        E = time_embed_dim
        self.time_embed = nn.Sequential(SinusoidalEmbedding(E), nn.Linear(E, 2 * E), nn.Mish(), nn.Linear(2 * E, E))
        width = input_dim * horizon + n_times * E + global_cond_dim
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        layers.append(nn.Linear(width, input_dim * horizon))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, times: tuple[torch.Tensor, ...], cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1:] != (self.horizon, self.input_dim):
            raise ValueError(f"MLPNet input must be (batch, {self.horizon}, {self.input_dim}); got {tuple(x.shape)}")
        if len(times) != self.n_times:
            raise ValueError(f"MLPNet expects {self.n_times} time input(s), got {len(times)}")
        feats = [x.flatten(1)] + [self.time_embed(t) for t in times]
        if self.global_cond_dim:
            if cond is None or cond.shape != (x.shape[0], self.global_cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"MLPNet conditioning must be ({x.shape[0]}, {self.global_cond_dim}); got {got}")
            feats.append(cond)
        return self.mlp(torch.cat(feats, dim=-1)).reshape(x.shape)


class BCActor(nn.Module):
    """Behavior cloning actor (CORL's BC recipe): Linear-ReLU-Linear-ReLU-Linear, tanh output.

    Deterministic: inputs (batch, in_dim) normalized -> (batch, act_dim) normalized actions in (-1, 1) (the
    project's actions are min/max-normalized to [-1, 1]; CORL scales tanh by max_action instead).
    hidden: layer widths, (256, 256) in CORL.
    """

    def __init__(self, in_dim: int, act_dim: int, hidden=(256, 256)):
        super().__init__()
        self.in_dim, self.act_dim = int(in_dim), int(act_dim)
        dims = [self.in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], self.act_dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"BC actor input must be (batch, {self.in_dim}); got {tuple(x.shape)}")
        return self.net(x)
