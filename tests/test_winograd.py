"""Winograd's F(m, k) convolution (ractd.nets.winograd) and the per-layer engine built on it (ractd.engine_layers)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ractd import engine
from ractd.config import UNetConfig
from ractd.engine import EngineConfig, EngineSelector, FoldedUnet, _Body
from ractd.engine_layers import forms_for, layered_copy, measure_layers
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.nets.winograd import WinogradConv1d, supported, winograd_conv1d, winograd_matrices


def _correlate(d, g):
    """The oracle: y_i = sum_j g_j d_{i+j}, by hand."""
    return [sum(g[j] * d[i + j] for j in range(len(g))) for i in range(len(d) - len(g) + 1)]


@pytest.mark.parametrize("m,k", [(4, 5), (2, 5), (4, 3), (2, 3), (6, 3), (1, 5)])
def test_the_transforms_compute_the_correlation_of_a_tile_exactly(m, k):
    at, g, bt = winograd_matrices(m, k)
    assert at.shape == (m, m + k - 1) and g.shape == (m + k - 1, k) and bt.shape == (m + k - 1, m + k - 1)
    rng = np.random.default_rng(m * 10 + k)
    for _ in range(5):   # small integers: float64 represents every intermediate value exactly
        d = rng.integers(-9, 10, m + k - 1).astype(float)
        kern = rng.integers(-9, 10, k).astype(float)
        y = at @ ((g @ torch.from_numpy(kern)) * (bt @ torch.from_numpy(d)))
        np.testing.assert_allclose(y.numpy(), _correlate(d, kern), atol=1e-9)


# (length, kernel, padding) with at least one output
CASES = [(n, k, p) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17) for k, p in ((5, 2), (3, 1), (5, 0), (3, 0))
         if n + 2 * p >= k]


@pytest.mark.parametrize("length,k,padding", CASES)
def test_winograd_conv1d_is_conv1d_in_float64_and_close_in_float32(length, k, padding):
    torch.manual_seed(length * 7 + k)
    conv = nn.Conv1d(6, 10, k, padding=padding).double()
    x = torch.randn(3, 6, length, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
    out = winograd_conv1d(x, conv.weight, conv.bias, padding)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # float32, the kernel transformed once (the engines' form): a few times the convolution's own rounding
    w32 = WinogradConv1d(conv.float())(x.float())
    scale = float(ref.abs().max())
    assert float((w32.double() - ref).abs().max()) <= 2e-5 * scale


def test_winograd_conv1d_gradients_are_conv1d_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, 7, dtype=torch.float64)
    grads_ref = torch.autograd.grad((F.conv1d(x, w, b, padding=2) * up).sum(), (x, w, b))
    grads = torch.autograd.grad((winograd_conv1d(x, w, b, 2) * up).sum(), (x, w, b))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_only_stride_one_ungrouped_zero_padded_convolutions_are_swapped():
    ok = nn.Conv1d(4, 4, 5, padding=2)
    assert supported(ok)
    for bad in [nn.Conv1d(4, 4, 3, stride=2, padding=1), nn.Conv1d(4, 4, 5, padding=2, groups=2),
                nn.Conv1d(4, 4, 5, padding=2, padding_mode="circular"), nn.Conv1d(4, 4, 1),
                nn.ConvTranspose1d(4, 4, 4, 2, 1)]:
        assert not supported(bad)
    net = nn.Sequential(ok, nn.Conv1d(4, 4, 3, stride=2, padding=1))
    assert "winograd" in forms_for(net[0]) and "winograd" not in forms_for(net[1])
    swapped = layered_copy(net, {"0": "winograd"})
    assert isinstance(swapped[0], WinogradConv1d) and type(swapped[1]) is nn.Conv1d
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(swapped(x), net(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the layers engine

TINY = UNetConfig(down_dims=(16, 32), time_embed_dim=16, n_groups=4)


def _body(batch=3):
    torch.manual_seed(0)
    net = ConditionalUnet1D(3, 5, TINY, n_times=2).eval().requires_grad_(False)
    folded = FoldedUnet(net, 8, EngineConfig(engine="eager", precision="fp32", cache=False))
    body = _Body(net, folded.sizes).eval()
    example = (torch.randn(batch, 8, 3), folded.bias_for((1.0, -1.0)) + torch.randn(batch, folded.width))
    return body, example


@pytest.mark.parametrize("form", ["gemm", "winograd", "exp"])
def test_a_body_with_every_layer_in_one_form_computes_the_body(form):
    body, example = _body()
    layers = {name: form for name, m in body.named_modules() if form in forms_for(m)}
    assert layers   # the form applies to some layers of the U-Net
    copy = layered_copy(body, layers)
    kinds = {type(m).__name__ for name, m in copy.named_modules() if name in layers}
    assert kinds == {"gemm": {"GemmConv1d", "GemmConvTranspose1d"}, "winograd": {"WinogradConv1d"},
                     "exp": {"MishExp"}}[form]
    with torch.inference_mode():
        torch.testing.assert_close(copy(*example), body(*example), rtol=1e-4, atol=1e-5)


def test_a_layer_cannot_be_given_a_form_that_does_not_compute_it():
    body, _ = _body()
    strided = next(n for n, m in body.named_modules() if type(m) is nn.Conv1d and m.stride == (2,))
    with pytest.raises(ValueError, match="cannot run in form 'winograd'"):
        layered_copy(body, {strided: "winograd"})


def test_measure_layers_keeps_native_unless_a_form_beats_it_by_the_margin(monkeypatch):
    """Timings planted through the timer: Winograd measured at 0.5x native everywhere it applies, gemm at 0.97x
    (inside the margin 0.95: not taken, also where Winograd does not apply), Mish's exp at 2x (slower)."""
    body, example = _body()
    factor = {"native": 1.0, "gemm": 0.97, "winograd": 0.5, "exp": 2.0}

    def timer(fns, rounds, round_s, **kw):
        for fn in fns.values():
            fn()   # each form still runs (its output was checked before)
        return ({k: factor[k] * 1e-3 for k in fns}, {k: factor[k] * 1e-3 for k in fns})

    monkeypatch.setattr("ractd.engine_layers.seconds_per_call", timer)
    choice, records = measure_layers(body, example, rounds=2, round_s=0.01, margin=0.95)
    winograd_able = {n for n, m in body.named_modules() if "winograd" in forms_for(m)}
    assert choice == {n: "winograd" for n in winograd_able}
    assert {r["form"] for r in records} == {"winograd", "native"}
    assert any(r["layer"].startswith("Mish") and r["form"] == "native" for r in records)


def test_a_form_whose_output_differs_is_never_chosen(monkeypatch):
    body, example = _body()
    monkeypatch.setattr(WinogradConv1d, "forward", lambda self, x: torch.zeros(1))   # planted wrong output
    monkeypatch.setattr("ractd.engine_layers.seconds_per_call",
                        lambda fns, *a, **k: ({f: (0.1 if f == "winograd" else 1.0) for f in fns},) * 2)
    choice, records = measure_layers(body, example, rounds=2, round_s=0.01, margin=0.95)
    assert "winograd" not in choice.values()
    assert all("winograd" not in r["ms"] for r in records)


def test_the_layers_engine_is_calibrated_per_bucket_and_rebuilt_from_its_record(monkeypatch):
    torch.manual_seed(0)
    net = ConditionalUnet1D(3, 5, TINY, n_times=2).eval().requires_grad_(False)
    monkeypatch.setattr(engine, "candidates", lambda cfg, threads: ["eager", "layers"])
    cfg = EngineConfig(precision="fp32", calibrate_s=0.01, rounds=1)
    first = FoldedUnet(net, 8, cfg)
    first.selector.choice(3)
    record = first.selector.measured[4]
    assert isinstance(record["layers"], dict) and set(record["layers"].values()) <= {"gemm", "winograd", "exp"}

    def no_measuring(*a, **k):
        raise AssertionError("measured the layers again although the record holds them")

    monkeypatch.setattr("ractd.engine.measure_layers", no_measuring)
    monkeypatch.setattr(engine, "choose", lambda *a, **k: "layers")
    second = FoldedUnet(net, 8, cfg)
    engine.write_calibration(engine.calibration_path(), second.selector.key(4),
                             {**record, "choice": "layers", "load": 0.0})
    x, cond = torch.randn(3, 8, 3), torch.randn(3, 5)
    out = second.prepare(cond, 3)(x, (2.0, 0.5))
    assert second.selector.layer_choice[4] == record["layers"]
    ref = net(x, (torch.full((3,), 2.0), torch.full((3,), 0.5)), cond)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_the_layers_engine_is_fp32_only():
    fp32 = engine.candidates(EngineConfig(precision="fp32"), 1)
    bf16 = engine.candidates(EngineConfig(precision="bf16"), 1)
    assert "layers" in fp32 and not any(n.startswith("layers") for n in bf16)
    sel = EngineSelector(FoldedUnet(_body()[0].net, 8, EngineConfig(precision="fp32", cache=False)),
                         EngineConfig(engine="layers", precision="bf16", cache=False))
    assert sel.choice(5) == "layers"


def test_a_cached_record_that_did_not_measure_a_candidate_of_today_is_measured_again(monkeypatch):
    """A record written before the layers engine existed names a choice still installed (gemm) but never measured
    layers: it is measured again, and the new record lists the candidates it measured."""
    cfg = EngineConfig(precision="fp32", calibrate_s=0.01, rounds=1)
    monkeypatch.setattr(engine, "candidates", lambda cfg, threads: ["eager", "gemm", "layers"])
    folded = FoldedUnet(_body()[0].net, 8, cfg)
    old = {"choice": "gemm", "ms": {"eager": 2.0, "gemm": 1.0}, "load": 0.0}
    engine.write_calibration(engine.calibration_path(), folded.selector.key(2), old)
    calls = []
    calibrate = EngineSelector.calibrate
    monkeypatch.setattr(EngineSelector, "calibrate", lambda self, b, batch=None: calls.append(b) or
                        calibrate(self, b, batch))
    folded.selector.choice(2)
    assert calls == [2] and folded.selector.measured[2]["candidates"] == ["eager", "gemm", "layers"]
    again = FoldedUnet(_body()[0].net, 8, cfg)
    record = {**folded.selector.measured[2], "load": 0.0}
    engine.write_calibration(engine.calibration_path(), again.selector.key(2), record)
    again.selector.choice(2)
    assert calls == [2]   # the new record is complete: used as it is
