"""The training step's fast paths (ractd.accel) against the plain ones: the same numbers up to float rounding after
several steps (fused / foreach AdamW vs torch's for-loop, the foreach EMA vs the per-tensor loop, the GEMM
convolutions vs native ones, the student's stacked calls vs one by one, a compiled step vs eager); the resolved
choice written in the checkpoint's config and a checkpoint from before the field resuming."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from ractd import RactdError, accel, accel_layers, ctm, edm
from ractd.config import UNET_PRESETS
from ractd.nets.mlp import ResidualMLP
from ractd.nets.unet1d import ConditionalUnet1D, load_teacher_into_student


def _unet(n_times=1, preset="tiny"):
    return ConditionalUnet1D(3, 5, UNET_PRESETS[preset], n_times=n_times)


def _close(a, b, rtol=1e-5, atol=1e-6, msg=""):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=rtol, atol=atol, err_msg=msg)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 10, 5, padding=2), nn.Conv1d(6, 10, 3, stride=2, padding=1),
                                  nn.Conv1d(6, 10, 1), nn.ConvTranspose1d(6, 10, 4, stride=2, padding=1)])
def test_gemm_convolution_equals_the_native_one_with_gradients(conv):
    x = torch.randn(4, 6, 8, requires_grad=True)
    y, y_gemm = conv(x), accel._gemm_call(conv, x)
    _close(y_gemm, y)
    g = torch.autograd.grad(y.pow(2).sum(), [x, conv.weight, conv.bias])
    g_gemm = torch.autograd.grad(y_gemm.pow(2).sum(), [x, conv.weight, conv.bias])
    for a, b, name in zip(g_gemm, g, ("input", "weight", "bias")):
        _close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_unet_with_every_convolution_as_gemm_is_the_same_network():
    net = _unet()
    gemm = copy.deepcopy(net)
    names = [n for n, m in gemm.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    accel.set_conv_impls(gemm, {n: (True, True) for n in names})
    assert set(accel.conv_impls(gemm)) == set(names) and list(gemm.state_dict()) == list(net.state_dict())
    x, t, cond = torch.randn(6, 16, 3), torch.rand(6) * 5, torch.randn(6, 5)
    out, out_gemm = net(x, (t,), cond), gemm(x, (t,), cond)
    _close(out_gemm, out, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()))
    grads_gemm = torch.autograd.grad(out_gemm.pow(2).sum(), list(gemm.parameters()))
    for (name, _), a, b in zip(net.named_parameters(), grads_gemm, grads):
        _close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():  # the no-gradient choice applies under no_grad; a copy keeps the choice
        _close(copy.deepcopy(gemm)(x, (t,), cond), out, rtol=1e-4, atol=1e-5)
    with accel.native_convs(gemm):  # evaluation code sees the network as built; the choice comes back after
        assert accel.conv_impls(gemm) == {}
    assert set(accel.conv_impls(gemm)) == set(names)
    accel.set_conv_impls(gemm, {})
    assert accel.conv_impls(gemm) == {}


def test_mish_from_one_exp_equals_torch_mish_with_gradients():
    x = torch.cat([torch.linspace(-60, 60, 2001), torch.tensor([-19.99, 19.99, 20.0, 20.01, 0.0, 1e-6])])
    x = x.double().float().requires_grad_(True)
    y, y_exp = nn.functional.mish(x), accel.mish_exp(x)
    _close(y_exp, y, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(x)
    (dx,), (dx_exp,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_exp, x, g)
    _close(dx_exp, dx, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the path without a graph
        _close(accel.mish_exp(x), y, rtol=1e-6, atol=1e-6)


def test_the_mish_check_catches_a_wrong_derivative(monkeypatch):
    """The defect planted once: the backward without the x sigmoid(x) (1 - tanh^2) term must fail the check."""
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return accel_layers._mish_terms(x)[1] * grad

    monkeypatch.setattr(accel._MishExp, "backward", staticmethod(backward))
    with pytest.raises(AssertionError):
        test_mish_from_one_exp_equals_torch_mish_with_gradients()


@pytest.mark.parametrize("form", accel.FORMS[1:])
def test_a_unet_in_every_form_is_the_same_network(form):
    torch.manual_seed(0)
    net = ConditionalUnet1D(3, 5, UNET_PRESETS["tiny"], n_times=2)
    fast = copy.deepcopy(net)
    accel.set_forms(fast, *form)
    assert accel.forms(fast) == form and list(fast.state_dict()) == list(net.state_dict())
    x, t, s, cond = torch.randn(6, 16, 3), torch.rand(6) * 5, torch.rand(6), torch.randn(6, 5)
    out, out_fast = net(x, (t, s), cond), fast(x, (t, s), cond)
    assert out_fast.shape == out.shape
    _close(out_fast, out, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()))
    grads_fast = torch.autograd.grad(out_fast.pow(2).sum(), list(fast.parameters()))
    for (name, _), a, b in zip(net.named_parameters(), grads_fast, grads):
        _close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    twin = copy.deepcopy(fast)  # a copy (the EMA, a Ray object) keeps the form and computes with its own weights
    assert accel.forms(twin) == form
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
        assert not torch.allclose(twin(x, (t, s), cond), out, atol=1e-3)
    with accel.native_convs(fast):  # evaluation code (exports, engines) sees the network as built
        assert accel.forms(fast) == ("ncl", "native")
        _close(fast(x, (t, s), cond), out, rtol=1e-4, atol=1e-5)
    assert accel.forms(fast) == form
    accel.set_forms(fast)
    assert accel.forms(fast) == ("ncl", "native")


def test_the_nhwc_form_under_bf16_autocast_is_the_native_network_under_it():
    """On a CPU with bf16 hardware accel auto pairs the forms with autocast bf16: the 2D convolutions must take
    autocast's bf16 as the 1D ones do (a loose tolerance: bf16's rounding differs between the two kernels)."""
    torch.manual_seed(0)
    net = _unet()
    fast = copy.deepcopy(net)
    accel.set_forms(fast, "nhwc", "exp")
    x, t, cond = torch.randn(6, 16, 3), torch.rand(6) * 5, torch.randn(6, 5)
    dtypes = []
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv1d) and m.kernel_size == (5,))
    conv.register_forward_hook(lambda mod, args, out: dtypes.append((out.ndim, out.dtype)))
    outs = {}
    for name, m in (("native", net), ("nhwc", fast)):
        with accel.autocast_context("bf16", "cpu"):
            out = m(x, (t,), cond)
        outs[name] = out.float(), torch.autograd.grad(out.float().pow(2).sum(), list(m.parameters()))
    assert dtypes == [(4, torch.bfloat16)]  # the 2D convolution ran, in autocast's bf16
    assert outs["nhwc"][0].dtype == torch.float32 and torch.isfinite(outs["nhwc"][0]).all()
    _close(outs["nhwc"][0], outs["native"][0], rtol=5e-2, atol=5e-2)
    for a, b in zip(outs["nhwc"][1], outs["native"][1]):
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(float(a.norm()), float(b.norm()), rtol=0.1, atol=1e-3)

def test_the_nhwc_layout_and_gemm_layers_exclude_each_other():
    net = _unet()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv1d)]
    accel.set_forms(net, "nhwc", "exp")
    with pytest.raises(RactdError, match="nhwc"):
        accel.set_conv_impls(net, {names[0]: (True, False)})
    accel.set_forms(net)
    accel.set_conv_impls(net, {names[0]: (True, False)})
    with pytest.raises(RactdError, match="GEMM"):
        accel.set_forms(net, "nhwc", "native")
    accel.set_forms(net, "ncl", "exp")  # the Mish form leaves GEMM layers alone
    assert accel.forms(net) == ("ncl", "exp") and set(accel.conv_impls(net)) == {names[0]}


def test_plan_resolves_the_forms_by_measuring_the_whole_network(monkeypatch, tmp_path):
    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path))
    den, teacher = edm.Denoiser(_unet()), edm.Denoiser(_unet())
    plan = accel.plan_for("auto", "fp32", den, teacher, 8, 16, "cpu")  # a tiny net: nothing measured
    assert (plan.accel, plan.layout, plan.mish) == ("eager", "ncl", "native")
    assert plan.forms_calibration["skipped"] and accel.forms(den.net) == ("ncl", "native")
    monkeypatch.setattr(accel_layers, "FORMS_MIN_MACS", 0)
    monkeypatch.setattr(accel_layers, "FORM_MARGIN", 0.0)  # no form can win by that margin: native
    plan = accel.plan_for("auto", "fp32", den, teacher, 8, 16, "cpu")
    rec = plan.forms_calibration
    assert plan.layout == "ncl" and plan.mish == "native" and set(rec["best_ms"]) == {"/".join(f) for f in accel.FORMS}
    assert max(rec["max_abs_diff"].values()) < 1e-4 and accel.forms(den.net) == ("ncl", "native")
    assert (tmp_path / "engines" / "training_forms.json").exists()
    key = next(iter(json.loads((tmp_path / "engines" / "training_forms.json").read_text())["entries"]))
    from ractd import engine_records

    entries = engine_records.read_calibration(tmp_path / "engines" / "training_forms.json")
    engine_records.write_calibration(tmp_path / "engines" / "training_forms.json", key,
                                     {**entries[key], "choice": ["nhwc", "exp"], "load": 0.0})
    plan = accel.plan_for("auto", "fp32", den, teacher, 8, 16, "cpu")  # the machine's cached choice, applied
    assert (plan.accel, plan.layout, plan.mish) == ("nhwc", "nhwc", "exp")
    assert accel.forms(den.net) == accel.forms(teacher.net) == ("nhwc", "exp")
    assert json.dumps(plan.record())
    plan = accel.plan_for("nhwc", "fp32", edm.Denoiser(_unet()), None, 8, 16, "cpu")  # asked for: unmeasured
    assert (plan.accel, plan.layout, plan.mish, plan.forms_calibration) == ("nhwc", "nhwc", "exp", {})
    plan = accel.plan_for("eager", "fp32", edm.Denoiser(_unet()), None, 8, 16, "cpu")
    assert (plan.accel, plan.layout, plan.mish) == ("eager", "ncl", "native")


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.Adam])
def test_fast_optimizers_follow_the_for_loop_one_over_many_steps(impl, kind):
    if impl == "fused" and accel.optimizer_impl("cpu") != "fused":
        pytest.skip("this torch has no fused CPU AdamW")
    torch.manual_seed(0)
    ref = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    fast = [p.detach().clone().requires_grad_(True) for p in ref]
    kw = dict(lr=1e-2, betas=(0.95, 0.999), weight_decay=1e-4)
    opt_ref = accel.set_optimizer_impl(kind(ref, **kw), "for-loop")
    opt_fast = accel.set_optimizer_impl(kind(fast, **kw), impl)
    for step in range(25):
        for a, b in zip(ref, fast):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_fast.step()
        if step == 10:  # a resumed optimizer: the saved state restores the writer's own flags, reset after
            opt_fast = kind(fast, **kw)
            opt_fast.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as from a file
            accel.set_optimizer_impl(opt_fast, impl)
            assert opt_fast.param_groups[0]["fused"] is (True if impl == "fused" else None)
    for a, b in zip(ref, fast):
        _close(b, a, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _reference_ema(ema, model, decay):
    """The EMA as the project wrote it before ractd.accel: one lerp per parameter and floating buffer."""
    for a, b in zip(ema.parameters(), model.parameters()):
        a.lerp_(b, 1.0 - decay)
    for a, b in zip(ema.buffers(), model.buffers()):
        if b.is_floating_point():
            a.lerp_(b, 1.0 - decay)


def _check_ema(update) -> None:
    """`update(ema, model, decay)` against the per-tensor reference loop over several steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 3), nn.BatchNorm1d(3))
    ema_ref, ema = copy.deepcopy(model), copy.deepcopy(model)
    for k in range(1, 8):
        with torch.no_grad():
            for p in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
                p.add_(torch.randn_like(p))
        _reference_ema(ema_ref, model, 0.9)
        update(ema, model, 0.9)
    for (name, a), b in zip(ema_ref.state_dict().items(), ema.state_dict().values()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_foreach_ema_equals_the_per_tensor_loop():
    _check_ema(accel.ema_update)
    _check_ema(lambda ema, model, decay: accel.ema_update(ema, model, decay, foreach=False))


def test_the_ema_check_catches_an_ema_that_skips_a_parameter():
    """The defect planted once: an EMA update missing the last parameter must fail the check above."""
    def skips_one(ema, model, decay):
        pairs = list(zip(ema.parameters(), model.parameters()))[:-1]
        with torch.no_grad():
            torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1 - decay)

    with pytest.raises(AssertionError):
        _check_ema(skips_one)


def test_grad_norm_equals_clip_grad_norm_and_leaves_the_gradients():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = accel.grad_norm(model.parameters())
    np.testing.assert_allclose(float(norm), float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))),
                               rtol=1e-6)
    for p, g in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.grad.numpy(), g.numpy())


def _student_case():
    torch.manual_seed(0)
    teacher = edm.Denoiser(_unet()).requires_grad_(False)
    student = ctm.Student(_unet(n_times=2))
    load_teacher_into_student(student.net, teacher.net)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reward = ResidualMLP(5, 3, (8, 8)).requires_grad_(False)
    return student, teacher, reward, torch.rand(12, 16, 3) * 2 - 1, torch.randn(12, 5)


@pytest.mark.parametrize("cfg", [ctm.DistillConfig(sigma=0.5), ctm.DistillConfig(),
                                 ctm.DistillConfig(sigma=0.5, reward_variant="ctm", dsm_form="jump")])
def test_stacked_student_calls_give_the_unstacked_loss_and_gradients(cfg):
    student, teacher, reward, x0, cond = _student_case()
    out = {}
    for batched in (False, True):
        torch.manual_seed(3)  # the same draws: the stacked path draws in the unstacked order
        terms = ctm.ractd_loss(student, teacher, reward, x0, cond, cond, cfg, batched=batched)
        out[batched] = terms, torch.autograd.grad(terms["loss"], list(student.parameters()))
    (ref, g_ref), (fast, g_fast) = out[False], out[True]
    assert set(ref) == set(fast)
    for k in ref:
        _close(fast[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    for (name, _), a, b in zip(student.named_parameters(), g_fast, g_ref):
        _close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_the_student_loss_in_the_nhwc_form_gives_the_native_loss_and_gradients():
    student, teacher, reward, x0, cond = _student_case()
    fast_student, fast_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    for net in (fast_student, fast_teacher):
        accel.set_forms(net, "nhwc", "exp")
    cfg = ctm.DistillConfig(sigma=0.5)
    out = {}
    for name, (s, t) in {"native": (student, teacher), "nhwc": (fast_student, fast_teacher)}.items():
        torch.manual_seed(3)
        terms = ctm.ractd_loss(s, t, reward, x0, cond, cond, cfg)
        out[name] = terms, torch.autograd.grad(terms["loss"], list(s.parameters()))
    (ref, g_ref), (fast, g_fast) = out["native"], out["nhwc"]
    for k in ref:
        _close(fast[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    for (name, _), a, b in zip(student.named_parameters(), g_fast, g_ref):
        _close(a, b, rtol=1e-3, atol=1e-5, msg=name)

def test_autocast_resolves_to_bf16_only_on_bf16_hardware(monkeypatch):
    for flags, expected in (({"avx512f"}, "fp32"), ({"amx_bf16", "amx_tile"}, "bf16"), ({"avx512_bf16"}, "bf16")):
        monkeypatch.setattr(accel, "cpu_flags", lambda flags=flags: flags)
        assert accel.resolve_autocast("auto", "cpu") == expected
    assert accel.resolve_autocast("fp32", "cpu") == "fp32" and accel.resolve_autocast("bf16", "cpu") == "bf16"


def test_plan_resolves_auto_by_the_calibration(monkeypatch):
    den = edm.Denoiser(_unet())
    plan = accel.plan_for("auto", "fp32", den, None, 8, 16, "cpu")
    assert plan.accel == "eager" and plan.gemm_layers == {}  # a tiny net: nothing worth measuring
    monkeypatch.setattr(accel_layers, "CALIBRATE_MIN_MACS", 0)  # every layer measured, and the GEMM form "faster"
    monkeypatch.setattr(accel_layers, "_measure_layer", lambda *a, **k: {"grad": True, "nograd": False, "rows": 8})
    monkeypatch.setattr(accel, "confirm", lambda *a, **k: False)  # ... but not the whole network: eager
    plan = accel.plan_for("auto", "fp32", den, None, 8, 16, "cpu")
    assert plan.accel == "eager" and plan.gemm_layers == {} and accel.conv_impls(den.net) == {}
    monkeypatch.setattr(accel, "confirm", lambda *a, **k: True)
    teacher = edm.Denoiser(_unet())
    plan = accel.plan_for("auto", "fp32", den, teacher, 8, 16, "cpu")
    assert plan.accel == "gemm" and plan.gemm_layers and set(accel.conv_impls(den.net)) == set(plan.gemm_layers)
    assert accel.conv_impls(teacher.net) == {}  # the teacher only runs without gradients: GEMM there was not chosen
    assert json.dumps(plan.record())  # what goes into the checkpoint's meta


def test_confirm_measures_the_whole_network_and_leaves_it_native():
    den = edm.Denoiser(_unet())
    names = [n for n, m in den.net.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    record = []
    ok = accel.confirm(den.net, accel.unet_example(den.net, 8, 16, "cpu"), {n: (True, True) for n in names},
                       "fp32", record)
    assert isinstance(ok, bool) and record[0]["confirmed"] == ok and set(record[0]["grad_ms"]) == {"native", "gemm"}
    assert accel.conv_impls(den.net) == {}  # the caller applies the choice


def test_bf16_autocast_step_is_close_to_fp32_but_not_equal():
    den = edm.Denoiser(_unet())
    x0, cond = torch.rand(8, 16, 3) * 2 - 1, torch.randn(8, 5)
    losses = {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        with accel.autocast_context(p, "cpu"):
            losses[p] = edm.edm_loss(den, x0, cond).mean()
    # a behavioural change, not a rounding difference
    assert float(losses["bf16"].detach()) != float(losses["fp32"].detach())
    np.testing.assert_allclose(float(losses["bf16"].detach()), float(losses["fp32"].detach()), rtol=5e-2)


@pytest.mark.slow
def test_a_compiled_teacher_step_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    den = edm.Denoiser(_unet())
    compiled = copy.deepcopy(den)
    accel.plan_for("compile", "fp32", compiled, None, 8, 16, "cpu")
    x0, cond = torch.rand(8, 16, 3) * 2 - 1, torch.randn(8, 5)
    for seed in range(2):  # the second call runs the compiled graph
        out = {}
        for name, model in (("eager", den), ("compiled", compiled)):
            torch.manual_seed(seed)
            loss = edm.edm_loss(model, x0, cond).mean()
            out[name] = loss, torch.autograd.grad(loss, list(model.parameters()))
        _close(out["compiled"][0], out["eager"][0], rtol=1e-5)
        for a, b in zip(out["compiled"][1], out["eager"][1]):
            _close(a, b, rtol=1e-4, atol=1e-6)


def _train_tiny(tmp_path, **kw):
    from ractd.train import RunContext, TrainConfig, train

    cfg = TrainConfig(task="maze2d-umaze", stage="teacher", scale="tiny", preset="tiny", batch=8, report_every=5,
                      run_dir=str(tmp_path / "run"), ckpt_every=5, **kw)
    return train(cfg, RunContext(progress=False))


@pytest.fixture
def maze_tiny():
    from ractd.data.generate_maze import generate_maze

    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)


def test_the_checkpoint_records_the_resolved_choice(maze_tiny, tmp_path):
    out = _train_tiny(tmp_path, steps=5)
    ck = torch.load(out["checkpoint"], weights_only=False)
    assert ck["config"]["accel"] in ("eager", "gemm", "nhwc") and ck["config"]["autocast"] == accel.resolve_autocast(
        "auto", "cpu")
    assert json.loads((tmp_path / "run" / "teacher" / "config.json").read_text())["accel"] == ck["config"]["accel"]
    rec = ck["meta"]["accel"]
    assert rec["optimizer"] == accel.optimizer_impl("cpu")
    assert rec["history"] == [{"from_step": 0, "accel": ck["config"]["accel"], "autocast": ck["config"]["autocast"],
                               "optimizer": rec["optimizer"]}]


def test_a_checkpoint_from_before_the_field_resumes(maze_tiny, tmp_path):
    from ractd.checkpoint import save_checkpoint

    out = _train_tiny(tmp_path, steps=5)
    path = out["checkpoint"]
    ck = torch.load(path, weights_only=False)
    for key in ("accel", "autocast"):  # as an older version wrote it
        del ck["config"][key]
    del ck["meta"]["accel"]
    for group in ck["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    save_checkpoint(path, ck)
    out = _train_tiny(tmp_path, steps=10)
    assert out["step"] == 10
    ck = torch.load(out["checkpoint"], weights_only=False)
    history = ck["meta"]["accel"]["history"]
    assert history[0] == {"from_step": 0, "accel": "eager", "autocast": "fp32", "optimizer": "for-loop"}
    if accel.optimizer_impl("cpu") == "fused":  # continued with the fused optimizer from the resumed step
        assert history[-1]["from_step"] == 5 and history[-1]["optimizer"] == "fused"
    assert all(np.isfinite(v.numpy()).all() for v in ck["model"].values())
    assert ck["config"]["accel"] in ("eager", "gemm", "nhwc")  # the resumed run writes its resolved config


@pytest.mark.gpu
def test_cuda_step_with_amp_bf16_tf32_and_compile():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    den = edm.Denoiser(_unet(1, "small")).to(cuda)
    compiled = copy.deepcopy(den)
    plan = accel.plan_for("compile", "auto", compiled, None, 64, 16, cuda)
    assert plan.autocast == "bf16" and plan.optimizer == "fused" and plan.accel == "compile"
    assert torch.backends.cuda.matmul.allow_tf32
    opt = accel.set_optimizer_impl(torch.optim.AdamW(compiled.parameters(), lr=1e-4), plan.optimizer)
    x0, cond = torch.rand(64, 16, 3, device=cuda) * 2 - 1, torch.randn(64, 5, device=cuda)
    for seed in range(3):
        torch.manual_seed(seed)
        with plan.context(cuda):
            loss = edm.edm_loss(compiled, x0, cond).mean()
        torch.manual_seed(seed)
        ref = edm.edm_loss(den, x0, cond).mean()
        assert torch.isfinite(loss)
        if seed == 0:  # the same weights: bf16 changes the loss by its rounding, not more
            np.testing.assert_allclose(float(loss), float(ref), rtol=5e-2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert torch.isfinite(accel.grad_norm(compiled.parameters()))
        opt.step()


def test_training_in_the_nhwc_form_follows_the_eager_run(maze_tiny, tmp_path):
    out = {a: _train_tiny(tmp_path / a, steps=6, accel=a) for a in ("eager", "nhwc")}
    ck = {a: torch.load(o["checkpoint"], weights_only=False) for a, o in out.items()}
    assert ck["nhwc"]["config"]["accel"] == "nhwc" and ck["eager"]["config"]["accel"] == "eager"
    assert (ck["nhwc"]["meta"]["accel"]["layout"], ck["nhwc"]["meta"]["accel"]["mish"]) == ("nhwc", "exp")
    moved = 0
    for name, w in ck["eager"]["model"].items():
        np.testing.assert_allclose(ck["nhwc"]["model"][name].numpy(), w.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)
        moved += not torch.equal(w, ck["nhwc"]["model"][name])
    assert moved  # rounding differs somewhere: the two runs really took different paths
