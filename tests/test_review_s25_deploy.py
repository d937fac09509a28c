"""Review session 25, issue #3: deploying a trained Bayesian model (export, conversion to a
plain network, compact export and reloading)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import bbb
from bbb.config import ConfigError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, 3))


def _mean_output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad(), bbb.sampling(model, "mean"):
        return model(x)


@pytest.mark.parametrize("where", ["model", "submodule"])
def test_to_deterministic_of_a_compiled_model_is_the_plain_network(where: str) -> None:
    model = _mlp()
    x = torch.randn(5, 4)
    if where == "model":
        compiled: nn.Module = torch.compile(model)
    else:
        compiled = nn.Sequential(torch.compile(model[:2]), model[2])
    det = bbb.to_deterministic(compiled)
    # the plain network (was: a copy of the torch.compile wrapper)
    assert all("OptimizedModule" not in type(m).__name__ for m in det.modules())
    plain: nn.Module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    if where == "submodule":
        plain = nn.Sequential(plain[:2], plain[2])
    # its keys are the plain architecture's (were "_orig_mod.0.weight", ...: a RuntimeError)
    plain.load_state_dict(det.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), _mean_output(model, x), rtol=0, atol=0)
    # TorchScript takes it (was: "module, class, method, ... was expected, got Sequential")
    scripted = torch.jit.script(det)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), _mean_output(model, x), rtol=0, atol=0)


class _Scaled(bbb.BayesLinear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class _Tempered(bbb.BayesLinear):
    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return super().op(x, w, b) / 3


class _Defaults(bbb.BayesLinear):
    """A subclass that only changes the constructor's defaults: the same function."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, rho_init=-6.0)


@pytest.mark.parametrize(
    ("cls", "method"), [(_Scaled, "forward() of BayesLinear"), (_Tempered, "op() of BayesLinear")]
)
def test_to_deterministic_refuses_a_subclass_that_computes_another_function(
    cls: type[bbb.BayesLinear], method: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 2))
    # was: a plain nn.Linear, whose outputs differed from the mean network's
    with pytest.raises(
        TypeError, match=rf"{cls.__name__}: it overrides {re.escape(method)}.*sampling"
    ):
        bbb.to_deterministic(model)
    with pytest.raises(TypeError, match=cls.__name__):
        bbb.to_deterministic(model[0])


def test_to_deterministic_converts_a_subclass_that_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Defaults(3, 2), nn.ReLU())
    x = torch.randn(4, 3)
    det = bbb.to_deterministic(model)
    assert type(det[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(det(x), _mean_output(model, x), rtol=0, atol=0)


# --------------------------------------------------------------------- load_run without data
def _train_cli(*args: object) -> None:
    from bbb.cli import main

    common = ["--epochs", "1", "--hidden", "4", "--val-samples", "2", "--batch-size", "8"]
    common.append("--quiet")
    assert main(["train", *map(str, args), *common]) == 0


def _tiny_uci(d: Path, n_rows: int = 40) -> Path:
    """A tiny data set in the UCI split format (2 features, one split of 8 test rows)."""
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, 2, generator=g) * 3 + 1
    y = x @ torch.tensor([1.0, -1.0]) + 3.0
    rows = torch.cat([x, y[:, None]], 1).tolist()
    (d / "data.txt").write_text("".join(" ".join(f"{v:.6f}" for v in r) + "\n" for r in rows))
    (d / "index_features.txt").write_text("0\n1\n")
    (d / "index_target.txt").write_text("2\n")
    (d / "index_train_0.txt").write_text("".join(f"{i}\n" for i in range(8, n_rows)))
    (d / "index_test_0.txt").write_text("".join(f"{i}\n" for i in range(8)))
    return d


def _run_of(dataset: str, tmp_path: Path) -> tuple[Path, Path]:
    """A one-epoch ``bbb train`` run of ``dataset`` and the data directory it read."""
    run = tmp_path / "run"
    if dataset == "mnist":
        from bbb.data.checksums import MissingDataError

        try:
            bbb.data.load_mnist(split="test", subset=8)
        except MissingDataError as e:
            pytest.skip(f"no MNIST data: {e}")
        _train_cli("--dataset", "mnist", "--subset", "64", "--out", run)
        return run, tmp_path  # (the shared data: left alone)
    if dataset == "toy":
        _train_cli("--dataset", "toy", "--toy-n", "30", "--out", run)
        return run, tmp_path
    data = tmp_path / "data"
    _tiny_uci(data / "uci" / "tiny")
    _train_cli("--dataset", "uci", "--data-dir", data, "--uci-path", "tiny", "--out", run)
    return run, data


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("dataset", ["mnist", "toy", "uci"])
def test_load_run_without_its_data_serves_the_same_predictions(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment machine holds the run directory, not the training data: load_run read
    the data set anyway (MissingDataError). ``load_data=False`` rebuilds the model and
    likelihood from the run alone (a UCI run's statistics from its normalization.json)."""
    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    run, data_dir = _run_of(dataset, tmp_path)
    cfg, model, lik, data = bbb.load_run(run)
    x = data.train.tensors[0][:6]
    torch.manual_seed(0)
    expected = bbb.predict(model, x, likelihood=lik, num_samples=4)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    if dataset == "uci":
        import shutil

        shutil.rmtree(data_dir)  # the data set is gone (uci_path is a bare name)
    cfg2, model2, lik2, data2 = bbb.load_run(run, data_dir=empty, load_data=False)
    assert not model2.training and cfg2.device == cfg.device
    torch.manual_seed(0)
    got = bbb.predict(model2, x, likelihood=lik2, num_samples=4)
    for name in ("probs", "mean", "variance"):
        if hasattr(expected, name):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)
    assert (data2.in_features, data2.out_features) == (data.in_features, data.out_features)
    assert data2.classification == data.classification
    assert (data2.y_mean, data2.y_std) == (data.y_mean, data.y_std)
    assert data2.normalization == data.normalization
    assert len(data2.train) == 0 and data2.val is None and data2.test is None
    assert data2.train.tensors[0].shape[1:] == data.train.tensors[0].shape[1:]
    if dataset == "uci":
        # the default still reads the data set, and says it is missing
        from bbb.data.checksums import MissingDataError

        with pytest.raises(MissingDataError):
            bbb.load_run(run)


@pytest.mark.usefixtures("single_thread")
def test_load_run_without_data_names_a_missing_or_damaged_normalization_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    run, _ = _run_of("uci", tmp_path)
    norm = run / "normalization.json"
    saved = json.loads(norm.read_text())
    for content, why in (
        (None, "it is missing"),
        ("{", "it cannot be read"),
        (json.dumps({**saved, "x_mean": []}), "it does not hold the lists x_mean"),
        (json.dumps({**saved, "y_std": [None]}), "it does not hold the lists x_mean"),
    ):
        norm.unlink(missing_ok=True)
        if content is not None:
            norm.write_text(content)
        with pytest.raises(ConfigError, match=re.escape(f"{norm}, and {why}")):
            bbb.load_run(run, load_data=False)


# --------------------------------------------------------------------- compact export
class _Versioned(nn.Module):
    """A module with extra state (``get_extra_state``), as a user's preprocessing keeps it."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def forward(self, x: Tensor) -> Tensor:
        return x

    def get_extra_state(self) -> dict[str, int]:
        return {"version": self.version}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.version = state["version"]


def test_compact_export_keeps_a_modules_extra_state(tmp_path: Path) -> None:
    def build(version: int) -> nn.Sequential:
        return nn.Sequential(
            bbb.BayesLinear(4, 8, bias=False), _Versioned(version), nn.ReLU(), bbb.BayesLinear(8, 3)
        )

    torch.manual_seed(0)
    model = build(3)
    bbb.prune_by_snr(model, 0.5)
    path = tmp_path / "model.bbbc"
    # was: AttributeError: 'dict' object has no attribute 'detach'
    bbb.save_compact(model, path)
    loaded = build(1)
    bbb.load_compact(loaded, path)
    assert loaded[1].version == 3
    x = torch.randn(5, 4)
    torch.testing.assert_close(_mean_output(loaded, x), _mean_output(model, x), rtol=0, atol=0)


@dataclasses.dataclass
class _Info:
    version: int


class _WithInfo(nn.Module):
    """A module whose extra state is an object of its own class."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.info = _Info(version)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def get_extra_state(self) -> _Info:
        return self.info

    def set_extra_state(self, state: _Info) -> None:
        self.info = state


def test_load_compact_names_a_class_the_weights_only_load_refuses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 8), _WithInfo(3))
    bbb.prune_by_snr(model, 0.5)
    path = tmp_path / "model.bbbc"
    bbb.save_compact(model, path)
    loaded = nn.Sequential(bbb.BayesLinear(4, 8), _WithInfo(1))
    # was: "... is not a compact export (torch.load could not read it: UnpicklingError)"
    name = f"{__name__}._Info"
    with pytest.raises(ValueError, match=re.escape(f"add_safe_globals([{name}])")):
        bbb.load_compact(loaded, path)
    with torch.serialization.safe_globals([_Info]):
        bbb.load_compact(loaded, path)
    assert loaded[1].info == _Info(3)


def test_a_layer_used_inside_and_outside_a_compiled_submodule_stays_one_layer() -> None:
    torch.manual_seed(0)
    shared = bbb.BayesLinear(4, 4)
    model = nn.Sequential(torch.compile(nn.Sequential(shared, nn.ReLU())), shared)
    det = bbb.to_deterministic(model)
    assert det[0][0] is det[1] and type(det[1]) is nn.Linear
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(det(x), _mean_output(model, x), rtol=0, atol=0)


# --------------------------------------------------------------------- pruning in low precision
@pytest.mark.parametrize("per_layer", [False, True])
def test_pruning_a_float16_layer_ranks_by_snr_not_position(per_layer: bool) -> None:
    """In float16, sigma = softplus(rho) underflows to 0 below rho ~ -17: every SNR was inf,
    so pruning removed the first weights by position (not the smallest |mu|), and snr()
    gave NaN (inf * 0) for the pruned ones."""
    dtype = torch.float16
    torch.manual_seed(0)
    layer = bbb.BayesLinear(10, 10, dtype=dtype)
    with torch.no_grad():
        layer.weight_rho.fill_(-20.0)  # one sigma for all: the SNR order is |mu|'s
    result = bbb.prune_by_snr(layer, 0.5, per_layer=per_layer)
    assert result.removed == 50
    mask = layer.weight_mask
    assert mask is not None and mask.dtype == dtype
    mu = layer.weight_mu.detach().abs().float()
    assert mu[mask == 1].min() >= mu[mask == 0].max()
    snr = bbb.snr(layer)[""]
    assert not snr.isnan().any() and bool((snr[mask == 0] == 0).all())
    assert bool((snr[mask == 1] > 0).all()) and bool(torch.isfinite(snr).all())
    layer(torch.randn(2, 10, dtype=dtype))  # the mask's dtype is the layer's
