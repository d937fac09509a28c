"""Adam with PyTorch's fused kernel where the parameters allow it.

On CPU, ``torch.optim.Adam()`` without arguments runs its single-tensor loop (about ten tensor
operations, each a pass over memory, per parameter tensor); ``fused=True`` updates every
parameter in one vectorised pass with the same formulas (values agree to float rounding, not
bit for bit). Measured here (2-core AMD EPYC, torch 2.13.0+cpu; ``python
benchmarks/probes/trainer_optimizer.py``): the MNIST scale-mixture step at 2 x 1200 is ~11%
faster, see docs/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose fused step skips the per-call bookkeeping.

    ``torch.optim.Adam.step`` spends ~0.1-0.4 ms of Python per call around the fused kernel
    (a profiler range, hook loops, ``_init_group``'s checks, grouping the tensors by device
    and dtype), which is 5-10% of a small network's whole training step and of the bandit's
    updates (64 per environment step). When nothing needs that machinery, this class calls
    the same kernels with the same arguments (``_foreach_add_`` of the step counters, then
    ``_fused_adam_``), so the parameters and the state are bit-identical to the base class's;
    its state dict is the base class's too. Otherwise (a closure, step hooks, the profiler
    recording, a ``GradScaler``'s step, options the lean path does not cover: amsgrad,
    capturable, differentiable, a tensor learning rate or betas, sparse or mixed-device/dtype
    gradients, or state not yet created) it runs ``torch.optim.Adam.step`` unchanged.

    Unlike torch's fused step, either path moves the in-place version counter of each
    parameter it updated (:func:`torch.autograd.graph.increment_version`, one call per group:
    about a microsecond), as the unfused implementations do: a Bayesian layer's KL cached by
    its forward pass (keyed on the versions) is recomputed after a step even with no backward
    pass in between, and a backward pass through a graph recorded before the step raises
    autograd's in-place error instead of using the updated values silently. The numbers are
    unchanged.
    """

    def step(self, closure: Any = None) -> Any:
        """One Adam update of every parameter with a gradient; see the class docstring."""
        if closure is None and self._lean_step():
            return None
        loss = _hooked_adam_step(self, closure)
        for group in self.param_groups:
            if group.get("fused"):  # torch's fused kernel leaves the counters as they were
                _increment_version([p for p in group["params"] if p.grad is not None])
        return loss

    # skip torch.optim.Optimizer's profiler/hook wrapper: the fallback above runs it itself
    step.hooked = True  # type: ignore[attr-defined]

    def _lean_step(self) -> bool:
        """Run the fused update directly; False (nothing changed) where it cannot."""
        if (
            not _FUSED_ADAM
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_hooks_set()
            or getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
            # a GradScaler's step: the base class unscales the gradients and skips on inf
            or getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
        ):
            return False
        plans = []
        for group in self.param_groups:
            if not group.get("fused") or group["amsgrad"] or group["capturable"]:
                return False
            if group["differentiable"] or group.get("decoupled_weight_decay", False):
                return False
            lr, (beta1, beta2) = group["lr"], group["betas"]
            if not all(isinstance(v, float | int) for v in (lr, beta1, beta2)):
                return False
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state.get(p)
                if not state or g.is_sparse or p.is_complex():
                    return False  # the base class creates the state / raises its error
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                # one CPU device and dtype for the tensors the kernel updates, float32 CPU
                # step counters (what torch's fused Adam makes); anything else: torch's step
                kinds = {(t.device, t.dtype) for t in (*params, *grads, *exp_avgs, *exp_avg_sqs)}
                if len(kinds) != 1 or next(iter(kinds))[0].type != "cpu":
                    return False
                if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in steps):
                    return False
                plans.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
        with torch.no_grad():
            for group, params, grads, exp_avgs, exp_avg_sqs, steps in plans:
                beta1, beta2 = group["betas"]
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    amsgrad=False,
                    lr=float(group["lr"]),
                    beta1=float(beta1),
                    beta2=float(beta2),
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    grad_scale=None,
                    found_inf=None,
                )
                _increment_version(params)  # updated in place: see the class docstring
        return True


_FUSED_ADAM = hasattr(torch, "_fused_adam_") and hasattr(torch, "_foreach_add_")


def _increment_version(params: list[torch.Tensor]) -> None:
    """Mark ``params`` as modified in place for autograd (their version counters move)."""
    if params:
        torch.autograd.graph.increment_version(params)


def _global_hooks_set() -> bool:
    from torch.optim import optimizer as _opt

    # private names of torch.optim: where a release renames them, assume hooks (torch's step)
    pre = getattr(_opt, "_global_optimizer_pre_hooks", None)
    post = getattr(_opt, "_global_optimizer_post_hooks", None)
    return pre is None or post is None or bool(pre or post)


def _hooked_adam_step(opt: torch.optim.Adam, closure: Any) -> Any:
    """``torch.optim.Adam.step`` with the base class's profiler range and step hooks."""
    base = torch.optim.Adam.step
    if not getattr(base, "hooked", False):  # no plain Adam made yet: wrap it as torch would
        base = torch.optim.Optimizer.profile_hook_step(base)
    return base(opt, closure)


def adam(
    params: Iterable[nn.Parameter], lr: float, *, weight_decay: float = 0.0, eps: float = 1e-8
) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr, eps=eps, weight_decay=weight_decay)``, fused where this
    build has a fused kernel for the parameters' device and dtype (CPU and CUDA floating
    point, :class:`Adam`: the fused kernel called directly on CPU), else PyTorch's default
    implementation for them. The update rule is the same."""
    params = list(params)
    try:
        return Adam(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay)
