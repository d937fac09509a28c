"""bbb.train.optim.adam: PyTorch's fused Adam where available, the same update rule."""

from __future__ import annotations

import pytest
import torch

from bbb import runs
from bbb.config import TrainConfig
from bbb.train import optim as optim_mod
from bbb.train.optim import adam


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((40, 30), (30,), (1,))]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_on_cpu_and_same_updates_as_default_adam() -> None:
    a, b = _params(), _params()
    fused = adam(a, 1e-2, weight_decay=0.1, eps=1e-6)
    plain = torch.optim.Adam(b, lr=1e-2, weight_decay=0.1, eps=1e-6)
    assert fused.defaults["fused"] is True
    _run(fused, a, 50)
    _run(plain, b, 50)
    for pa, pb, p0 in zip(a, b, _params(), strict=True):
        assert (pa - p0).abs().max() > 0.01  # it moved by more than one step (lr)
        # each step moves a weight by up to ~lr; the two kernels order their float32
        # operations differently, so they agree to rounding (a few ulp per step), not bit for bit
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)


def test_falls_back_to_default_adam_where_fused_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.optim.Adam

    class NoFused(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, fused: bool | None = None, **kw: object) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be ... supported")
            super().__init__(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(optim_mod, "Adam", NoFused)
    monkeypatch.setattr(torch.optim, "Adam", NoFused)
    a, b = _params(), _params()
    opt = adam(a, 1e-2)
    assert isinstance(opt, NoFused) and not opt.defaults["fused"]
    _run(opt, a, 5)
    _run(real(b, lr=1e-2), b, 5)
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)  # the same implementation: bit for bit


def test_a_fused_state_loads_into_a_plain_adam() -> None:
    fresh = _params()
    f = adam(fresh, 1e-2)
    _run(f, fresh, 2)
    back = torch.optim.Adam(_params(), lr=1e-2)
    back.load_state_dict(f.state_dict())
    assert back.param_groups[0]["fused"] is True  # the saved implementation is kept
    assert int(back.state_dict()["state"][0]["step"]) == 2


def test_resume_of_a_plain_adam_run_is_bit_identical() -> None:
    """A checkpoint made before the fused default resumes with the implementation it was made
    with (load_state_dict restores the group's ``fused`` flag): the continuation is bit-identical
    to the uninterrupted run."""
    a, b = _params(), _params()
    o1 = torch.optim.Adam(a, lr=1e-2)
    o2 = torch.optim.Adam(b, lr=1e-2)
    _run(o1, a, 3)
    _run(o2, b, 3)
    o3 = adam(b, 1e-2)
    o3.load_state_dict(o2.state_dict())
    assert not o3.param_groups[0]["fused"]
    _run(o1, a, 3)
    _run(o3, b, 3)
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


def test_bbb_train_uses_it() -> None:
    cfg = TrainConfig.from_dict({"dataset": "mnist", "method": "bbb", "optimizer": "adam"})
    opt = runs._optimizer(cfg, _params())
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True


def _grads_run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    """Like _run, but the last parameter gets no gradient on odd steps and the learning rate
    changes half way (as a scheduler would)."""
    g = torch.Generator().manual_seed(2)
    for t in range(steps):
        for i, p in enumerate(params):
            skip = i == len(params) - 1 and t % 2 == 1
            p.grad = None if skip else torch.randn(p.shape, generator=g)
        if t == steps // 2:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        opt.step()


@pytest.mark.parametrize("maximize", [False, True])
def test_lean_fused_step_is_bit_identical_to_torch_fused_adam(
    maximize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bbb's Adam calls the fused kernel itself after the first step: parameters and state
    equal torch.optim.Adam(fused=True)'s bit for bit, over two parameter groups with their own
    settings, a parameter without a gradient on some steps and a learning-rate change."""
    calls = []
    real = optim_mod._hooked_adam_step

    def counted(opt: torch.optim.Adam, closure: object) -> object:
        calls.append(1)
        return real(opt, closure)

    monkeypatch.setattr(optim_mod, "_hooked_adam_step", counted)
    a, b = _params(), _params()

    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, object]]:
        return [
            {"params": ps[:1], "weight_decay": 0.1},
            {"params": ps[1:], "lr": 3e-2, "betas": (0.8, 0.99)},
        ]

    ours = optim_mod.Adam(groups(a), lr=1e-2, eps=1e-6, fused=True, maximize=maximize)
    ref = torch.optim.Adam(groups(b), lr=1e-2, eps=1e-6, fused=True, maximize=maximize)
    _grads_run(ours, a, 12)
    _grads_run(ref, b, 12)
    # the base step ran once: on step 0, when every parameter's state was created
    assert len(calls) == 1
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sb["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])


def test_lean_step_falls_back_for_closures_hooks_and_the_profiler() -> None:
    a = _params()
    opt = adam(a, 1e-2)
    assert isinstance(opt, optim_mod.Adam)
    _run(opt, a, 1)
    # a closure: its loss is returned (the base class's step)
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0
    # step hooks run
    seen: list[str] = []
    h1 = opt.register_step_pre_hook(lambda *_: seen.append("pre"))
    h2 = opt.register_step_post_hook(lambda *_: seen.append("post"))
    opt.step()
    assert seen == ["pre", "post"]
    h1.remove()
    h2.remove()
    # the profiler sees the optimizer's range as with torch's Adam
    with torch.profiler.profile() as prof:
        opt.step()
    assert any("Optimizer.step#" in e.name for e in prof.events())
    # and without any of them the parameters still move
    before = [p.detach().clone() for p in a]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(a, before, strict=True))


def test_lean_step_leaves_a_grad_scalers_step_to_torch() -> None:
    """torch.amp.GradScaler hands a fused optimizer its scale and inf flag as attributes; the
    lean path would ignore them (apply scaled gradients), so it must fall back: the result
    equals torch's fused Adam under the same scaler, and an inf gradient skips the step."""
    results = []
    for cls in (optim_mod.Adam, torch.optim.Adam):
        ps = _params()
        opt = cls(ps, lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        g = torch.Generator().manual_seed(3)
        for t in range(4):
            opt.zero_grad()
            loss = sum(((p * torch.randn(p.shape, generator=g)).sum() for p in ps), torch.zeros(()))
            if t == 2:
                loss = loss * float("inf")  # this step's gradients overflow: skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    # the overflowing step was skipped (an applied inf gradient would leave NaN), the others
    # moved the parameters
    assert all(torch.isfinite(a).all() for a in results[0])
    assert all(not torch.equal(a, p0) for a, p0 in zip(results[0], _params(), strict=True))
