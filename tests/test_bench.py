"""The benchmark (issue 8) runs on tiny sizes and produces its table and JSON.

No timing assertions: machines are noisy. This guards the output format, which is how
regressions are found.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from bbb import bench
from bbb.cli import main as cli_main

STEP_KEYS = {
    "net", "hidden", "library", "estimator", "prior", "num_samples", "ms", "ratio",
    "samples_ratio", "ms_all",
}  # fmt: skip


def test_quick_benchmark_writes_table_and_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = bench.main(
        ["--quick", "--no-peers", "--samples", "1,2", "--repeats", "2", "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "x det" in printed
    data = json.loads(out.read_text())
    assert {"schema", "machine", "settings", "step_time", "table", "inference", "memory",
            "grad_variance"} <= set(data)  # fmt: skip
    rows = data["step_time"]
    assert {r["library"] for r in rows} == {"deterministic", "bbb"}
    assert {r["net"] for r in rows} == {"mlp", "conv"}
    # every estimator x prior x S for each network, plus its deterministic floor
    for net in ("mlp", "conv"):
        bbb_rows = [r for r in rows if r["net"] == net and r["library"] == "bbb"]
        assert len(bbb_rows) == 3 * 2 * 2
    for r in rows:
        assert set(r) == STEP_KEYS
        assert r["ms"] > 0 and r["ratio"] > 0 and len(r["ms_all"]) == 2
        if r["library"] != "bbb" or r["num_samples"] == 1:
            assert r["samples_ratio"] is None
    det = [r for r in rows if r["library"] == "deterministic"]
    assert all(r["ratio"] == 1.0 for r in det)
    # each row's numbers are the ones its table describes: ms is the median of its rounds,
    # ratio its ms over the same network's deterministic ms, samples_ratio its ms over the
    # same configuration's S = 1 ms. Each is stored rounded to 3 decimals, so recomputing
    # from stored values agrees to the rounding: 5e-4 for the value itself plus the
    # propagated 5e-4 of each stored ms (ratio r = a / b: |dr| <= 5e-4 (1 + r) / b)
    det_ms = {(r["net"], r["hidden"]): r["ms"] for r in det}
    by_config = {
        (r["net"], r["hidden"], r["estimator"], r["prior"], r["num_samples"]): r["ms"] for r in rows
    }
    for r in rows:
        assert r["ms"] == pytest.approx(statistics.median(r["ms_all"]), abs=1e-3)
        det_r = det_ms[(r["net"], r["hidden"])]
        ratio = r["ms"] / det_r
        assert r["ratio"] == pytest.approx(ratio, abs=5e-4 + 5e-4 * (1 + ratio) / det_r), r
        if r["library"] == "bbb" and r["num_samples"] == 2:
            one = by_config[(r["net"], r["hidden"], r["estimator"], r["prior"], 1)]
            ratio = r["ms"] / one
            assert r["samples_ratio"] == pytest.approx(ratio, abs=5e-4 + 5e-4 * (1 + ratio) / one)
    assert {r["estimator"] for r in data["inference"]["rows"]} == {"reparam", "local", "flipout"}
    assert all(r["inputs_per_s"] > 0 for r in data["inference"]["rows"])
    assert all("peak_mib" in r and r["peak_mib"] > 0 for r in data["memory"])
    assert {r["estimator"] for r in data["grad_variance"]} == {"reparam", "local", "flipout"}
    # every estimator's minibatch gradient is noisy: a variance that is positive and finite
    assert all(
        0 < r["var_grad_mu"] < math.inf and 0 < r["var_grad_rho"] < math.inf
        for r in data["grad_variance"]
    )


def test_format_table_has_one_line_per_result() -> None:
    rows = [
        bench.StepResult("mlp", 8, "deterministic", "-", "-", 1, 1.0, 1.0),
        bench.StepResult("mlp", 8, "bbb", "local", "gaussian", 10, 5.0, 5.0, 3.0),
    ]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split()[:3] == ["net", "H", "library"]


def test_cli_forwards_bench_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_estimator_is_rejected() -> None:
    # a refused value (bbb prints it as one `bbb: error:` line, exit status 1)
    with pytest.raises(
        bench.BenchError,
        match=re.escape(
            "--estimators: unknown estimator 'nope'; accepted values: reparam, local, flipout"
        ),
    ):
        bench.main(["--quick", "--no-peers", "--estimators", "nope"])


@pytest.mark.slow
def test_compile_variant_is_timed_or_skipped_with_a_warning(tmp_path: Path) -> None:
    """``--compile`` adds a 'bbb-compile' row (the same step under torch.compile), or, where
    compilation is unavailable, warns and leaves the row out; the table is written either way."""
    import warnings

    out = tmp_path / "b.json"
    args = ["--quick", "--no-peers", "--compile", "--nets", "mlp", "--estimators", "reparam"]
    args += ["--priors", "gaussian", "--samples", "1", "--repeats", "2", "--json", str(out)]
    args += ["--no-inference", "--no-memory", "--no-variance"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bench.main(args) == 0
    libs = {r["library"] for r in json.loads(out.read_text())["step_time"]}
    skipped = any("torch.compile unavailable" in str(w.message) for w in caught)
    assert "bbb" in libs and (("bbb-compile" in libs) != skipped)


def test_kernels_variant_adds_rows_or_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--kernels`` adds 'bbb-kernels' rows (bbb.kernels' compile backend); a compilation
    failure leaves them out with a warning. torch.compile is replaced here (the identity, then
    a failure) so that the test does not build real kernels."""
    import torch

    from bbb import kernels as K

    def run(name: str) -> set[str]:
        out = tmp_path / f"{name}.json"
        args = ["--quick", "--no-peers", "--kernels", "--nets", "mlp", "--samples", "1"]
        args += ["--repeats", "2", "--json", str(out), "--no-inference", "--no-memory"]
        assert bench.main([*args, "--no-variance"]) == 0
        return {(r["library"], r["prior"]) for r in json.loads(out.read_text())["step_time"]}

    def reset() -> None:
        for k in K._ALL:
            k._compiled, k.failed = None, None

    reset()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    rows = run("ok")
    assert {("bbb-kernels", "gaussian"), ("bbb-kernels", "scale_mixture")} <= rows
    assert K.get_kernels() == "eager"  # the variant does not leak its backend

    def broken(fn: object, **kw: object) -> object:
        raise RuntimeError("no compiler")

    reset()
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="bbb-kernels|skipped"):
        rows = run("broken")
    assert all(lib != "bbb-kernels" for lib, _ in rows) and ("bbb", "gaussian") in rows
    reset()


def test_native_variant_adds_rows_or_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--native`` adds 'bbb-native' rows (a compile-backend failure does not remove them);
    where the native library cannot be built they are left out with a warning."""
    import torch

    from bbb import _native
    from bbb import kernels as K

    def run(name: str) -> set[str]:
        out = tmp_path / f"{name}.json"
        args = ["--quick", "--no-peers", "--native", "--kernels", "--nets", "mlp"]
        args += ["--samples", "1", "--repeats", "2", "--json", str(out), "--no-inference"]
        assert bench.main([*args, "--no-memory", "--no-variance"]) == 0
        return {(r["library"], r["prior"]) for r in json.loads(out.read_text())["step_time"]}

    def broken(fn: object, **kw: object) -> object:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    for k in K._ALL:
        monkeypatch.setattr(k, "failed", None)
        monkeypatch.setattr(k, "_compiled", None)
    if _native.available():
        with pytest.warns(UserWarning, match="bbb-kernels|skipped"):
            rows = run("native")
        assert ("bbb-native", "gaussian") in rows
        assert all(lib != "bbb-kernels" for lib, _ in rows)
    monkeypatch.setattr(_native, "_tried", True)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "RuntimeError: no C compiler found")
    monkeypatch.setattr(K, "_native_warned", False)
    # left out with a warning naming the backend and why (other warnings may come too: the
    # kernels' own RuntimeWarning, and the compile backend's skip above)
    with pytest.warns(
        UserWarning,
        match=r"bbb bench: kernel native not compiled \(.*no C compiler found.*\); skipped",
    ):
        rows = run("no-native")
    assert all(lib != "bbb-native" for lib, _ in rows) and ("bbb", "gaussian") in rows
    assert K.get_kernels() == "eager"


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist").is_dir(),
    reason="the shared MNIST data (../shared/data/mnist) is absent",
)
def test_time_to_accuracy_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/time_to_accuracy.py on a tiny subset (target reached at the first check),
    eager and with the compile backend (torch.compile replaced by the identity here)."""
    import importlib.util
    import sys

    import torch

    from bbb import kernels as K

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    assert spec is not None and spec.loader is not None
    tta = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "time_to_accuracy", tta)
    spec.loader.exec_module(tta)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    for backend in ("eager", "compile"):
        out = tmp_path / f"{backend}.json"
        args = ["--data-dir", str(data), "--libraries", "bbb", "--subset", "512", "--target"]
        args += ["1.0", "--eval-every", "1", "--eval-samples", "1", "--kernels", backend]
        assert tta.main([*args, "--json", str(out)]) == 0
        (res,) = json.loads(out.read_text())["results"]
        assert res["steps"] == 1 and res["seconds_to_target"] is not None
        assert res["kernels"] == backend and (res["compile_seconds"] is None) == (
            backend == "eager"
        )
    assert K.get_kernels() == "eager"
    for k in K._ALL:
        k._compiled, k.failed = None, None


def test_device_option_is_checked_and_recorded(tmp_path: Path) -> None:
    with pytest.raises(bench.BenchError, match="not a torch device"):
        bench.resolve_device("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(bench.BenchError, match="CUDA is not available"):
            bench.resolve_device("cuda")
    out = tmp_path / "bench.json"
    args = ["--quick", "--no-peers", "--nets", "mlp", "--samples", "1", "--repeats", "1"]
    rc = bench.main([*args, "--no-memory", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    machine = json.loads(out.read_text())["machine"]
    assert machine["device"] == "cpu" and machine["gpu"] is None
    assert isinstance(machine["allocator_tuned"], bool)


def test_a_configuration_that_fails_is_left_out_with_a_warning(monkeypatch) -> None:
    real = bench.build_step

    def flaky(library: str, *rest):  # the local estimator "breaks" (like a peer on a new torch)
        if rest[2] == "local":

            def broken() -> float:
                raise RuntimeError("boom")

            return broken
        return real(library, *rest)

    monkeypatch.setattr(bench, "build_step", flaky)
    with pytest.warns(UserWarning, match="bbb/local/gaussian/S=1 failed.*boom"):
        rows = bench.run_step_times(
            [("mlp", 8)], ["reparam", "local"], [1], ["gaussian"], [], 1, 1, lambda _: None, 4
        )
    assert {(r.library, r.estimator) for r in rows} == {("deterministic", "-"), ("bbb", "reparam")}
