"""Review (issue #4): defects in the scripts users copy (examples, benchmarks, experiments) that
type-checking them brought to light."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import bbb
from bbb import _native
from bbb import kernels as K

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "benchmarks" / "probes"

native = pytest.mark.skipif(not _native.available(), reason="native kernels not built")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@native
@pytest.mark.parametrize("estimator", ["flipout", "local"])
def test_mean_path_probe_unrouted_step_takes_no_mean_path(
    monkeypatch: pytest.MonkeyPatch, estimator: str
) -> None:
    # benchmarks/probes/mean_path.py times a layer step with the mean path through the native
    # node ("routed") against one without it; it patched native_sample_and_kl, which the layers
    # no longer call (they call native_layer_sample_and_kl), so both variants ran the routed
    # node: the same step timed twice, under two names
    asked: list[bool] = []
    real = K.native_layer_sample_and_kl

    def spy(*args: Any) -> K.NativeLayerOutputs:
        asked.append(bool(args[9]))  # mean_path, positional as the layer and the probe pass it
        return real(*args)

    # the probe swaps the kernels' functions while a step runs: monkeypatch puts them back
    monkeypatch.setattr(K, "native_sample_and_kl", K.native_sample_and_kl)
    monkeypatch.setattr(K, "native_layer_sample_and_kl", spy)
    monkeypatch.syspath_prepend(str(PROBES))
    mean_path = _load(PROBES / "mean_path.py", "_s25_mean_path")
    torch.manual_seed(0)
    layer = bbb.BayesLinear(6, 3, estimator=estimator)
    x = torch.randn(4, 6)

    def step() -> float:
        torch.manual_seed(1)  # both variants draw the same noise
        layer.zero_grad(set_to_none=True)
        loss = layer(x).pow(2).sum() + layer.kl()
        loss.backward()
        losses.append(loss.detach())
        return float(loss.detach())

    losses: list[torch.Tensor] = []
    grads: dict[bool, list[torch.Tensor]] = {}
    with K.use_kernels("native"):
        for route in (False, True):
            mean_path._with(route, step)()
            grads[route] = [losses[-1]]
            for p in layer.parameters():
                assert p.grad is not None
                grads[route].append(p.grad.clone())
            # after the step the layers call the patched-in function again
            assert K.native_layer_sample_and_kl is spy
    assert asked == [False, True]  # without the fix: [True, True] (the routed node twice)
    # the same function either way: only the pass summing mu's two gradients differs
    for off, on in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(off, on)


def test_mnist_driver_runs_on_python_3_10(monkeypatch: pytest.MonkeyPatch) -> None:
    # the project supports Python 3.10 (requires-python >= 3.10; tomli is its dependency there),
    # where the standard library has no tomllib: experiments/mnist/run.py imported tomllib
    # unconditionally, so every command of the driver died with ModuleNotFoundError on 3.10
    tomllib = pytest.importorskip("tomllib")  # the parser tomli is on 3.10 (on 3.11+: here)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # tomli: the same parser, by name
    d = runpy.run_path(str(ROOT / "experiments" / "mnist" / "run.py"), run_name="mnist_driver")
    # --set KEY=VALUE reads VALUE as TOML: the parser and its error both come from tomli
    assert d["_parse_set"]('lr_schedule="cosine"') == ("lr_schedule", "cosine")
    with pytest.raises(SystemExit, match="is not a TOML value"):
        d["_parse_set"]("lr_schedule=cosine")
