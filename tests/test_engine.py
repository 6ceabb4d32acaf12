"""Batch-aware inference engines (ractd.engine): the folded U-Net on every engine computes the eager numbers; the
samplers run through the engines match the library samplers (and an analytic flow); the calibration cache is
written atomically, reused, and rebuilt when unreadable; the choice never takes an engine measured slower than
eager. No timing assertions: speed is measured in bench/bench_inference.py."""

import json
import logging

import numpy as np
import pytest
import torch

from ractd import RactdError, ctm, ddpm, edm, engine, engine_records
from ractd.config import UNetConfig
from ractd.engine import EngineConfig, EngineSelector, FoldedUnet, bucket, choose
from ractd.nets.unet1d import ConditionalUnet1D
from ractd.policy import ddim_sampler, ddpm_sampler, heun_sampler, student_sampler

H, D, G = 8, 3, 5
TINY = UNetConfig(down_dims=(16, 32), time_embed_dim=16, n_groups=4)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32: a different summation order of the same products


def _net(n_times=1, seed=0, cond=G):
    torch.manual_seed(seed)
    net = ConditionalUnet1D(D, cond, TINY, n_times=n_times).eval().requires_grad_(False)
    with torch.no_grad():  # non-zero FiLM time columns and biases, so that folding them matters
        for b in net.film_blocks():
            b.film[1].bias.normal_(0, 0.3)
            b.film[1].weight.normal_(0, 0.3)
    return net


def _fixed(name):
    return EngineConfig(engine=name, precision="fp32", cache=False)


def _gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def _engines():
    names = ["eager", "jit", "gemm", "layers"]
    if engine._ov() is not None:
        names.append("openvino")
    return names


@pytest.mark.parametrize("name", _engines())
@pytest.mark.parametrize("batch", [1, 3])
def test_folded_unet_on_each_engine_computes_the_eager_net(name, batch):
    net = _net(n_times=2)
    folded = FoldedUnet(net, H, _fixed(name))
    x, cond = torch.randn(batch, H, D), torch.randn(batch, G)
    for times in [(1000.0, -900.0), (12.5, -3.0)]:
        ref = net(x, tuple(torch.full((batch,), t) for t in times), cond)
        out = folded.prepare(cond, batch)(x, times)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), **TOL)
    assert folded.selector.choice(batch) == name


@pytest.mark.skipif(engine._ov() is None, reason="OpenVINO not installed")
def test_openvino_static_batch_shape_computes_the_same_numbers():
    net = _net(n_times=2)
    folded = FoldedUnet(net, H, _fixed("openvino"))
    x, cond = torch.randn(3, H, D), torch.randn(3, G)
    ref = net(x, (torch.full((3,), 50.0), torch.full((3,), -900.0)), cond)
    call = folded.prepare(cond, 3)
    outs = [call(x, (50.0, -900.0)) for _ in range(engine.STATIC_AFTER + 2)]
    assert list(folded.selector.build("openvino").static) == [3]  # the repeated batch got its static model
    for out in (outs[0], outs[-1]):  # dynamic-batch model, then the static one
        np.testing.assert_allclose(out.numpy(), ref.numpy(), **TOL)


@pytest.mark.parametrize("name", _engines())
def test_the_torch_work_around_an_openvino_call_runs_on_one_thread_and_the_count_is_restored(name, monkeypatch):
    """OpenVINO runs on its own threads; torch's, spinning after the FiLM product and sum, took the cores from it
    (engine._glue_threads). The torch engines keep every thread."""
    seen = []
    bias_for = FoldedUnet.bias_for
    monkeypatch.setattr(FoldedUnet, "bias_for", lambda self, times: seen.append(torch.get_num_threads())
                        or bias_for(self, times))
    net = _net(n_times=2)
    folded = FoldedUnet(net, H, _fixed(name))
    x, cond = torch.randn(4, H, D), torch.randn(4, G)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = folded.prepare(cond, 4)(x, (12.5, -3.0))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert after == 2
    assert seen == [1 if name == "openvino" else 2]
    ref = net(x, (torch.full((4,), 12.5), torch.full((4,), -3.0)), cond)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), **TOL)


@pytest.mark.parametrize("name", ["auto", *_engines()])
def test_heun_sampler_through_an_engine_matches_the_library_sampler(name):
    teacher = edm.Denoiser(_net()).eval()
    cond, gens = torch.randn(4, G), _gens(4)
    ref = heun_sampler(teacher, (H, D), n_bins=12)(cond, gens)
    cfg = EngineConfig(engine=name, precision="fp32", calibrate_s=0.01, rounds=1)
    out = heun_sampler(teacher, (H, D), n_bins=12, engine=cfg)(cond, _gens(4))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(out[0], out[1])  # rows differ (their own noise and conditioning)


def test_bf16_engines_are_close_to_the_fp32_sampler_but_not_equal():
    """precision bf16 (what auto means on an AMX CPU): Heun-12 through gemm-bf16 (and OpenVINO bf16 when installed)
    stays within bf16 rounding of the fp32 library sampler -- and is not it (the bf16 path really ran)."""
    teacher = edm.Denoiser(_net()).eval()
    cond = torch.randn(4, G)
    ref = heun_sampler(teacher, (H, D), n_bins=12)(cond, _gens(4))
    for name in ["gemm"] + (["openvino"] if engine._ov() is not None else []):
        out = heun_sampler(teacher, (H, D), n_bins=12, engine=EngineConfig(engine=name, precision="bf16",
                                                                           cache=False))(cond, _gens(4))
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 5e-2, (name, err)
        if name == "gemm" or engine.cpu_flags() & {"avx512_bf16", "amx_bf16"}:  # OpenVINO runs f32 without them
            assert err > 1e-5, (name, err)


def test_heun_through_the_engines_follows_the_exact_gaussian_flow():
    """Analytic oracle: with F = 0 and EDM scalings, D(x, sigma) = sd^2 / (sd^2 + sigma^2) x is the Bayes denoiser
    of N(0, sd^2 I) data, whose probability-flow ODE maps x_T to x_T sqrt((sd^2 + s^2) / (sd^2 + T^2))."""
    net = _net()
    with torch.no_grad():
        net.final[1].weight.zero_()
        net.final[1].bias.zero_()
    teacher = edm.Denoiser(net, scalings="edm")
    sigmas = edm.karras_sigmas(80)
    x_T = 80.0 * torch.randn(6, H, D, generator=torch.Generator().manual_seed(1))
    fast = engine.FastDenoiser(teacher, H, sigmas, _fixed("eager"))
    out = edm.sample_heun(fast.bind(torch.randn(6, G)), x_T, sigmas, clamp=False)
    sd, s, T = edm.SIGMA_DATA, float(sigmas[-1]), float(sigmas[0])
    np.testing.assert_allclose(out.numpy(), (x_T * np.sqrt((sd**2 + s**2) / (sd**2 + T**2))).numpy(), rtol=2e-3,
                               atol=1e-5)


@pytest.mark.parametrize("n_steps", [1, 2])
def test_student_sampler_through_an_engine_matches_the_library_sampler(n_steps):
    student = ctm.Student(_net(n_times=2)).eval()
    cond = torch.randn(3, G)
    ref = student_sampler(student, (H, D), n_steps=n_steps)(cond, _gens(3))
    for name in _engines():
        out = student_sampler(student, (H, D), n_steps=n_steps, engine=_fixed(name))(cond, _gens(3))
        np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [lambda m, e: ddpm_sampler(m, (H, D), n_steps=10, engine=e),
                                   lambda m, e: ddim_sampler(m, (H, D), n_steps=5, engine=e)])
def test_ddpm_and_ddim_through_an_engine_match_the_library_samplers(build):
    model = ddpm.EpsModel(_net(), T=20).eval()
    cond = torch.randn(3, G)
    ref = build(model, None)(cond, _gens(3))
    out = build(model, _fixed("eager"))(cond, _gens(3))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


def test_bucket_rounds_up_to_a_power_of_two():
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 64, 65, 100)] == [1, 2, 4, 4, 8, 64, 128, 128]


def test_choose_never_takes_an_engine_slower_than_eager():
    assert choose({"eager": 1.0, "jit": 1.2, "openvino": 3.0}, 0.95) == "eager"
    assert choose({"eager": 1.0, "jit": 0.97}, 0.95) == "eager"          # inside the margin: not worth it
    assert choose({"eager": 1.0, "jit": 0.5, "openvino": 0.3}, 0.95) == "openvino"
    assert choose({"eager": 1.0}, 0.95) == "eager"


def test_choose_takes_an_engine_only_if_its_slowest_round_beats_eager():
    # the defect this guards: one round of a multi-second call chose jit at 0.94x eager; it then ran at 1.33x
    assert choose({"eager": 1.0, "jit": 0.94}, 0.95, {"eager": 1.05, "jit": 1.1}) == "eager"
    assert choose({"eager": 1.0, "jit": 0.90, "gemm": 0.80}, 0.95, {"eager": 1.0, "jit": 0.93, "gemm": 0.99}) == "jit"


def test_seconds_per_call_drops_a_clearly_slower_candidate_after_the_first_round():
    import time as _time

    calls = {"eager": 0, "slow": 0, "near": 0}

    def fn(name, s):
        def run():
            calls[name] += 1
            _time.sleep(s)
        return run

    best, worst = engine.seconds_per_call({"eager": fn("eager", 0.01), "slow": fn("slow", 0.03),
                                           "near": fn("near", 0.01)}, rounds=3, round_s=0.0, drop_above=1.25)
    assert calls == {"eager": 3, "slow": 1, "near": 3}
    assert best["slow"] > 2 * best["eager"] and all(worst[k] >= best[k] for k in best)


def _slow_engine(monkeypatch, calls):
    """Make "jit" a candidate that is eager plus a 30 ms sleep per call (the selector must measure it slower)."""
    import time as _time

    build = EngineSelector.build

    def fake_build(self, name, *args):
        run = build(self, name, *args)
        if name != "jit":
            return run

        def slow(x, films):
            calls.append(len(x))
            _time.sleep(0.03)
            return run(x, films)
        return slow

    monkeypatch.setattr(EngineSelector, "build", fake_build)
    monkeypatch.setattr(engine, "candidates", lambda cfg, threads: ["eager", "jit"])


def test_calibration_never_chooses_an_engine_measured_slower_than_eager(monkeypatch):
    calls = []
    _slow_engine(monkeypatch, calls)
    folded = FoldedUnet(_net(), H, EngineConfig(calibrate_s=0.01, rounds=2, cache=False))
    assert folded.selector.choice(5) == "eager"
    record = folded.selector.measured[8]
    assert calls and record["ms"]["jit"] > record["ms"]["eager"] and (record["bucket"], record["batch"]) == (8, 5)


def test_calibration_cache_is_written_atomically_and_reused(monkeypatch, tmp_path):
    path = engine.calibration_path()
    assert str(path).startswith(str(tmp_path))  # the tests' cache dir, never the user's
    cfg = EngineConfig(calibrate_s=0.01, rounds=1)
    first = FoldedUnet(_net(), H, cfg)
    choice = first.selector.choice(3)
    data = json.loads(path.read_text())
    key = first.selector.key(4)
    assert data["version"] == engine_records.CACHE_VERSION and data["entries"][key]["choice"] == choice
    assert set(data["entries"][key]["ms"]) == set(engine.candidates(cfg, first.selector.threads))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    def no_calibration(self, b, batch=None):
        raise AssertionError("measured again although the cache holds the bucket")

    monkeypatch.setattr(EngineSelector, "calibrate", no_calibration)
    second = FoldedUnet(_net(seed=1), H, cfg)  # same shapes, other weights: the same record
    assert second.selector.choice(4) == choice
    with pytest.raises(AssertionError, match="measured again"):
        second.selector.choice(9)  # a new bucket is measured

    # atomic: a write that fails before its rename leaves the old file whole and no temporary file
    before = path.read_bytes()
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        engine.write_calibration(path, "other", {"choice": "eager"})
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 99, "entries": {}}', b"\x00\xff"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(content, caplog):
    path = engine.calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    folded = FoldedUnet(_net(), H, EngineConfig(calibrate_s=0.01, rounds=1))
    with caplog.at_level(logging.WARNING, logger="ractd.engine"):
        choice = folded.selector.choice(2)
    assert any("ignoring the engine calibration cache" in r.getMessage() for r in caplog.records)
    data = json.loads(path.read_text())
    assert data["entries"][folded.selector.key(2)]["choice"] == choice


def test_a_cached_choice_of_an_engine_not_installed_is_measured_again(monkeypatch):
    cfg = EngineConfig(calibrate_s=0.01, rounds=1)
    folded = FoldedUnet(_net(), H, cfg)
    engine.write_calibration(engine.calibration_path(), folded.selector.key(1), {"choice": "no-such-engine"})
    assert folded.selector.choice(1) in engine.candidates(cfg, folded.selector.threads)


def test_bad_engine_options_are_one_line_errors():
    from ractd.evaluate import EvalConfig

    with pytest.raises(RactdError, match="engine='fast'"):
        EngineConfig(engine="fast").validate()
    with pytest.raises(RactdError, match="precision"):
        EngineConfig(precision="fp8").validate()
    with pytest.raises(RactdError, match="accelerate='jit'.*openvino"):
        EvalConfig(task="hopper-medium", engine="openvino", accelerate="jit").validate()
    with pytest.raises(RactdError, match="ConditionalUnet1D"):
        FoldedUnet(torch.nn.Linear(2, 2), H)


def test_precision_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch):
    from ractd.evaluate import effective_precision

    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert engine.resolve_precision("auto") == "fp32"   # bf16 conversions without AMX: little to gain
    assert FoldedUnet(_net(), H, EngineConfig(precision="auto", cache=False)).selector.cfg.precision == "fp32"
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert engine.resolve_precision("auto") == "bf16" and engine.resolve_precision("fp32") == "fp32"
    folded = FoldedUnet(_net(), H, EngineConfig(precision="auto", cache=False))
    assert folded.selector.cfg.precision == "bf16"
    assert set(engine.candidates(folded.selector.cfg, 1)) >= {"eager", "gemm-bf16"}
    # what the records store: the precision computed in; the library path and BC stay fp32 under auto
    assert effective_precision("student", "auto", "none", "auto") == "bf16"
    assert effective_precision("heun", "none", "none", "auto") == "fp32"
    assert effective_precision("student", "auto", "jit", "auto") == "fp32"
    assert effective_precision("bc", "auto", "none", "auto") == "fp32"
    assert effective_precision("student", "none", "none", "bf16") == "bf16"
    assert effective_precision("ddim", "auto", "none", "auto") == "fp32"   # not measured at bf16 (x_0 amplifies)
    assert effective_precision("heun", "auto", "none", "auto") == "bf16"


def test_a_record_measured_on_a_busy_machine_is_measured_again_when_it_is_quiet(monkeypatch):
    cfg = EngineConfig(precision="fp32", calibrate_s=0.01, rounds=1)
    folded = FoldedUnet(_net(), H, cfg)
    cpus = __import__("os").cpu_count()
    every = {"candidates": engine.candidates(cfg, folded.selector.threads)}   # a record that measured them all
    engine.write_calibration(engine.calibration_path(), folded.selector.key(2),
                             {"choice": "eager", "load": float(cpus) + 1.0, **every})
    monkeypatch.setattr("os.getloadavg", lambda: (cpus + 2.0, 0.0, 0.0))
    assert folded.selector._cached(2)["choice"] == "eager"     # still busy: the record stands
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.0, 0.0))
    assert folded.selector._cached(2) is None                  # quieter now: measured again
    engine.write_calibration(engine.calibration_path(), folded.selector.key(2),
                             {"choice": "eager", "load": 0.5, **every})
    assert folded.selector._cached(2)["choice"] == "eager"     # a record from a quiet machine is kept


def test_two_streams_are_not_a_candidate_for_a_single_row(monkeypatch):
    monkeypatch.setattr(engine, "candidates", lambda cfg, threads: ["eager", "openvino-2s"])
    built = []
    build = EngineSelector.build

    def spy(self, name, *args):
        built.append(name)
        return build(self, name, *args) if name == "eager" else (lambda x, films: build(self, "eager")(x, films))

    monkeypatch.setattr(EngineSelector, "build", spy)
    folded = FoldedUnet(_net(), H, EngineConfig(precision="fp32", calibrate_s=0.01, rounds=1, cache=False))
    assert folded.selector.choice(1) == "eager" and "openvino-2s" not in built
    folded.selector.choice(3)
    assert "openvino-2s" in built


def test_the_engines_that_lost_the_calibration_are_released():
    folded = FoldedUnet(_net(), H, EngineConfig(precision="fp32", calibrate_s=0.01, rounds=1, cache=False))
    chosen = folded.selector.choice(4)
    assert set(folded.selector._built) == {"eager", EngineSelector._key(chosen, 4)}
    assert set(folded.selector.measured[4]["ms"]) >= {"eager", "jit", "gemm"}  # they did run


def test_a_new_buckets_build_and_calibration_count_as_setup_and_a_known_bucket_costs_none(monkeypatch):
    """ractd.timing.setup_seconds grows by the calibration of a new bucket (rollouts subtract it from the policy
    time they record) and not at all for a bucket already chosen."""
    from ractd import timing

    calls = []
    _slow_engine(monkeypatch, calls)  # jit sleeps 30 ms a call: the calibration takes at least its rounds
    folded = FoldedUnet(_net(), H, EngineConfig(calibrate_s=0.01, rounds=2, cache=False))
    s0 = timing.setup_seconds()
    folded.selector.choice(5)
    grown = timing.setup_seconds() - s0
    assert grown >= 0.03 * len(calls) > 0
    s1 = timing.setup_seconds()
    folded.selector.engine_for(6)  # the same bucket (8), its engine built: nothing set up
    assert timing.setup_seconds() == s1
