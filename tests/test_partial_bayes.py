"""Partly Bayesian networks: ``bbb.bayesianize(include=..., exclude=...)``, ``rho_init="moped"``,
and the whole workflow (ELBO, Trainer, predict, pruning, compact files, export) on a network
whose deterministic part is frozen; the ``examples/bayesian_last_layer.py`` smoke test."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.convert import MOPED_MIN_SIGMA, convertible_layers, moped_rho
from bbb.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def mlp() -> nn.Sequential:
    """body (Linear 4->8, ReLU, Linear 8->8, ReLU) -> head (Linear 8->3)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(8, 3)))


def bayesian_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, bbb.BayesModule)]


def quiet_bayesianize(model: nn.Module, **kwargs: object) -> nn.Module:
    """bayesianize, failing on any warning (a partial conversion on purpose warns nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return bbb.bayesianize(model, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- selection
def test_include_a_name_converts_that_layer_only_and_keeps_the_rest() -> None:
    plain = mlp()
    bayes = quiet_bayesianize(plain, include="head", init_from_weights=True)
    assert bayesian_names(bayes) == ["head"]
    assert type(bayes.get_submodule("body.0")) is nn.Linear
    # the body is an unchanged copy; the mean network computes the original function
    for p, q in zip(plain.body.parameters(), bayes.get_submodule("body").parameters(), strict=True):
        assert p is not q and torch.equal(p, q)
    x = torch.randn(5, 4)
    with bbb.sampling(bayes, "mean"):
        assert torch.equal(bayes(x), plain(x))


def test_a_container_name_selects_every_layer_inside_it() -> None:
    assert bayesian_names(quiet_bayesianize(mlp(), include="body")) == ["body.0", "body.2"]
    assert bayesian_names(quiet_bayesianize(mlp(), include="body.*")) == ["body.0", "body.2"]
    # fnmatch syntax: a character class, a list of patterns
    assert bayesian_names(quiet_bayesianize(mlp(), include="body.[2-9]")) == ["body.2"]
    got = bayesian_names(quiet_bayesianize(mlp(), include=["body.0", "head"]))
    assert got == ["body.0", "head"]


def test_exclude_wins_over_include() -> None:
    assert bayesian_names(quiet_bayesianize(mlp(), exclude="body.0")) == ["body.2", "head"]
    got = bayesian_names(quiet_bayesianize(mlp(), include="body", exclude="body.0"))
    assert got == ["body.2"]


def test_predicates_get_qualified_names_and_modules() -> None:
    seen: list[tuple[str, type]] = []

    def last(name: str, module: nn.Module) -> bool:
        seen.append((name, type(module)))
        return isinstance(module, nn.Linear) and module.out_features == 3

    assert bayesian_names(quiet_bayesianize(mlp(), include=last)) == ["head"]
    assert seen == [("body.0", nn.Linear), ("body.2", nn.Linear), ("head", nn.Linear)]
    got = quiet_bayesianize(mlp(), exclude=lambda name, m: name.startswith("body"))
    assert bayesian_names(got) == ["head"]


def test_default_conversion_is_unchanged_by_the_selection() -> None:
    """No include/exclude converts every layer with the same random draws as include='*'
    (and as before: the construction order and the draws are the same)."""
    torch.manual_seed(3)
    a = bbb.bayesianize(mlp())
    torch.manual_seed(3)
    b = bbb.bayesianize(mlp(), include="*")
    assert bayesian_names(a) == bayesian_names(b) == ["body.0", "body.2", "head"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_convertible_layers_lists_the_names_include_takes() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    assert convertible_layers(model) == ["0", "3"]
    assert convertible_layers(nn.Linear(2, 2)) == [""]
    last = convertible_layers(model)[-1]
    assert bayesian_names(quiet_bayesianize(model, include=last)) == ["3"]


def test_inplace_and_a_model_that_is_itself_a_layer() -> None:
    model = mlp()
    body0 = model.body[0]
    out = quiet_bayesianize(model, include="head", inplace=True)
    assert out is model and isinstance(model.head, bbb.BayesLinear) and model.body[0] is body0
    assert isinstance(quiet_bayesianize(nn.Linear(2, 2), include="*"), bbb.BayesLinear)
    with pytest.raises(ValueError, match=r"can convert: <model> \(Linear\)"):
        bbb.bayesianize(nn.Linear(2, 2), include="head")


def test_a_layer_used_in_two_places_is_selected_by_either_name() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(OrderedDict(a=shared, act=nn.ReLU(), b=shared, out=nn.Linear(3, 2)))
    for name in ("a", "b"):
        bayes = quiet_bayesianize(model, include=name)
        assert isinstance(bayes.a, bbb.BayesLinear) and bayes.a is bayes.b
        assert type(bayes.out) is nn.Linear
    bayes = quiet_bayesianize(model, exclude="b")  # excluded if any of its names is
    assert type(bayes.a) is nn.Linear and bayes.a is bayes.b
    assert isinstance(bayes.out, bbb.BayesLinear)


def test_a_misspelt_pattern_is_an_error_listing_the_layers() -> None:
    for kind in ("include", "exclude"):
        with pytest.raises(ValueError, match=rf"{kind} pattern 'haed' matches no layer") as e:
            bbb.bayesianize(mlp(), **{kind: "haed"})  # type: ignore[arg-type]
        assert "body.0 (Linear), body.2 (Linear), head (Linear)" in str(e.value)
    # one bad pattern in a list is enough
    with pytest.raises(ValueError, match="include pattern 'body.9'"):
        bbb.bayesianize(mlp(), include=["head", "body.9"])


def test_a_pattern_naming_a_module_that_is_not_converted_names_it() -> None:
    model = nn.Sequential(
        OrderedDict(emb=nn.Embedding(5, 4), act=nn.ReLU(), fc=nn.Linear(4, 2), done=None)
    )
    with pytest.raises(ValueError, match=r"it matches emb \(Embedding\), which is not"):
        bbb.bayesianize(model, include="emb")
    with pytest.raises(ValueError, match=r"it matches act \(ReLU\)"):
        bbb.bayesianize(model, exclude="act")
    partly = bbb.bayesianize(mlp(), include="head")
    with pytest.raises(ValueError, match=r"head \(BayesLinear, already Bayesian\)"):
        bbb.bayesianize(partly, include="head")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"include": []}, ValueError, "include is empty"),
        ({"exclude": ()}, ValueError, "exclude is empty"),
        ({"include": ""}, ValueError, "empty pattern"),
        ({"include": 3}, TypeError, r"include must be None, a module-name pattern .* got int"),
        ({"exclude": [b"head"]}, TypeError, "the list holds b'head'"),
        ({"include": nn.Linear(2, 2)}, TypeError, "got Linear"),
        ({"include": lambda n, m: None}, TypeError, "must return True or False, got None"),
        ({"include": lambda n, m: False}, ValueError, "returned False for every layer"),
        ({"exclude": lambda n, m: False}, ValueError, "exclude predicate"),
        ({"exclude": "*"}, ValueError, "removes every layer bayesianize can convert"),
        (
            {"include": "body", "exclude": "body.*"},
            ValueError,
            "removes every layer include='body' selects",
        ),
    ],
)
def test_bad_selections_are_refused(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        bbb.bayesianize(mlp(), **kwargs)


def test_warnings_only_for_the_selected_part() -> None:
    """Deterministic weight layers, hooks and frozen layers outside the selection are the
    user's choice: no warning; inside it (a pattern that covers an embedding) they warn."""
    model = nn.Sequential(
        OrderedDict(
            emb=nn.Embedding(5, 4),
            body=nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
            head=nn.Linear(4, 2),
        )
    )
    model.body[0].register_forward_hook(lambda *a: None)
    model.body[0].weight.requires_grad_(False)
    quiet_bayesianize(model, include="head")  # emb, body's hook and frozen weight: silent
    quiet_bayesianize(model, exclude=["emb", "body"])
    with pytest.warns(UserWarning, match=r"deterministic: emb \(Embedding\)"):
        bbb.bayesianize(model, include="*", exclude="body")
    with pytest.warns(UserWarning, match="exclude= silences this"):
        bbb.bayesianize(model, exclude="body")
    with pytest.warns(UserWarning, match=r"replaced layers that had hooks: body\.0"):
        bbb.bayesianize(model, include="body", init_from_weights=True)


# ----------------------------------------------------------------------------- MOPED
def test_moped_sets_sigma_in_proportion_to_the_trained_weights() -> None:
    plain = mlp()
    with torch.no_grad():
        plain.head.weight[0, 0] = 0.0  # gets the floor
    bayes = quiet_bayesianize(
        plain, include="head", init_from_weights=True, rho_init="moped", moped_delta=0.2
    )
    head = bayes.get_submodule("head")
    assert isinstance(head, bbb.BayesLinear) and head.bias_sigma is not None
    want_w = (0.2 * plain.head.weight.detach().abs()).clamp_min(MOPED_MIN_SIGMA)
    want_b = 0.2 * plain.head.bias.detach().abs()
    # rho computed in float64 and rounded once to float32, softplus in float32: a few ulps
    torch.testing.assert_close(head.weight_sigma, want_w, rtol=1e-5, atol=0)
    torch.testing.assert_close(head.bias_sigma, want_b, rtol=1e-5, atol=0)
    assert torch.equal(head.weight_mu, plain.head.weight)  # mu at the weights, as always
    rho00 = float(head.weight_rho.detach()[0, 0])
    assert math.isfinite(rho00) and rho00 < -18
    # the body stays a plain, untouched network
    assert type(bayes.get_submodule("body.0")) is nn.Linear


def test_moped_rho_inverts_softplus_in_every_range() -> None:
    w = torch.tensor([0.0, 1e-9, 1e-3, 1.0, 50.0, -300.0], dtype=torch.float64)
    rho = moped_rho(w, 0.1)
    assert rho.dtype == torch.float64 and torch.isfinite(rho).all()
    want = (0.1 * w.abs()).clamp_min(MOPED_MIN_SIGMA)
    torch.testing.assert_close(F.softplus(rho), want, rtol=1e-12, atol=0)
    half = moped_rho(w.to(torch.float16), 0.1)  # computed in float64, rounded once
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_moped_default_delta_and_a_float64_model() -> None:
    plain = mlp().double()
    bayes = quiet_bayesianize(plain, init_from_weights=True, rho_init="moped")
    head = bayes.get_submodule("head")
    assert isinstance(head, bbb.BayesLinear) and head.weight_mu.dtype == torch.float64
    want = (0.1 * plain.head.weight.detach().abs()).clamp_min(MOPED_MIN_SIGMA)
    torch.testing.assert_close(head.weight_sigma, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho_init": "moped"}, "needs init_from_weights=True"),
        ({"rho_init": "mopd"}, r"unknown rho_init 'mopd'; accepted values: .*'moped'"),
        ({"rho_init": (1.0, 0.0)}, r"low <= high.*'moped'"),
        ({"moped_delta": 0.1}, "only used with rho_init='moped'"),
        ({"rho_init": "moped", "init_from_weights": True, "moped_delta": 0}, "above 0"),
        ({"rho_init": "moped", "init_from_weights": True, "moped_delta": True}, "above 0"),
        ({"rho_init": "moped", "init_from_weights": True, "moped_delta": math.inf}, "above 0"),
    ],
)
def test_bad_rho_init_or_moped_delta_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bbb.bayesianize(mlp(), **kwargs)


# ----------------------------------------------------------------------------- workflow
def frozen_partial() -> nn.Sequential:
    """mlp() with a Bayesian head (MOPED) and a frozen body."""
    bayes = bbb.bayesianize(mlp(), include="head", init_from_weights=True, rho_init="moped")
    assert isinstance(bayes, nn.Sequential)
    bayes.get_submodule("body").requires_grad_(False)
    return bayes


def data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_elbo_kl_and_sampling_checks_on_a_frozen_partial_model() -> None:
    model = frozen_partial()
    x, y = data()
    torch.manual_seed(0)
    result = bbb.ELBO(bbb.Categorical(), len(x), num_samples=3)(model, x, y)
    result.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == ["head.weight_mu", "head.weight_rho", "head.bias_mu", "head.bias_rho"]
    head = model.get_submodule("head")
    assert isinstance(head, bbb.BayesModule)
    # the network's KL is the head's (the body has none)
    assert torch.equal(bbb.kl_divergence(model), head.kl())
    assert float(result.kl.detach()) == pytest.approx(float(head.kl().detach()), rel=1e-6)
    with bbb.sampling(model, "mean"), pytest.warns(RuntimeWarning, match="sampling mode 'mean'"):
        bbb.ELBO(bbb.Categorical(), len(x))(model, x, y)


def test_trainer_fine_tunes_the_head_only_and_its_checkpoint_round_trips(
    tmp_path: Path,
) -> None:
    model = frozen_partial()
    x, y = data()
    body_before = {k: v.clone() for k, v in model.get_submodule("body").state_dict().items()}
    head = model.get_submodule("head")
    mu_before = head.weight_mu.detach().clone()
    g = torch.Generator().manual_seed(0)
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Categorical(), len(x), num_samples=2),
        torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2),
        DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g),
        val_loader=DataLoader(TensorDataset(x, y), batch_size=48),
        epochs=2,
        out_dir=tmp_path / "run",
        val_samples=2,
        progress=False,
        log=None,
        loader_generator=g,
    )
    trainer.fit()
    trainer.load_best()
    for k, v in model.get_submodule("body").state_dict().items():
        assert torch.equal(v, body_before[k]), k
    assert not torch.equal(head.weight_mu, mu_before)
    assert all(not p.requires_grad for p in model.get_submodule("body").parameters())
    # best.pt loads into a freshly built partly Bayesian network of the same architecture
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    fresh = bbb.bayesianize(mlp(), include="head")
    fresh.load_state_dict(state)
    xs = data(8)[0]
    with bbb.sampling(model, "mean"), bbb.sampling(fresh, "mean"):
        assert torch.equal(fresh(xs), model(xs))


def test_predict_prune_compact_and_export_on_a_frozen_partial_model(tmp_path: Path) -> None:
    model = frozen_partial()
    x, _ = data(16)
    torch.manual_seed(0)
    pred = bbb.predict(model, x, num_samples=5)
    assert isinstance(pred, bbb.ClassificationPrediction)
    assert pred.probs.shape == (16, 3) and bool((pred.epistemic >= 0).all())
    # pruning sees the head only; the body is untouched
    assert set(bbb.snr(model)) == {"head"}
    result = bbb.prune_by_snr(model, 0.5)
    assert result.total == 24 + 3 or result.total == 24  # weights (and biases, if pruned)
    assert set(result.per_layer) == {"head"}
    # compact file round trip into a new network of the same architecture
    path = tmp_path / "compact.pt"
    bbb.save_compact(model, path)
    other = bbb.bayesianize(
        nn.Sequential(OrderedDict(body=mlp().body, head=nn.Linear(8, 3))), include="head"
    )
    bbb.load_compact(other, path)
    with bbb.sampling(model, "mean"), bbb.sampling(other, "mean"):
        assert torch.equal(other(x), model(x))
    # the mean network as plain torch.nn; frozen flags carried over
    plain = bbb.to_deterministic(model)
    assert not bayesian_names(plain)
    assert [p.requires_grad for p in plain.parameters()] == [False] * 4 + [True] * 2
    with bbb.sampling(model, "mean"):
        assert torch.equal(plain(x), model(x))


# ----------------------------------------------------------------------------- example
def load_example() -> ModuleType:
    path = ROOT / "examples" / "bayesian_last_layer.py"
    spec = importlib.util.spec_from_file_location("example_bayesian_last_layer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bayesian_last_layer_example_runs(tmp_path: Path) -> None:
    """The example end to end on tiny synthetic data, in this process (a subprocess spends
    most of its seconds importing torch): only the head becomes Bayesian, the frozen body
    does not move, and every reported number is in its range."""
    example = load_example()
    assert example.parse_args([]).out == "runs/examples/bayesian_last_layer"
    assert example.parse_args([]).threads == 1
    with pytest.raises(SystemExit):
        example.parse_args(["--moped-delta", "0"])
    threads = torch.get_num_threads()
    try:
        report = example.main(
            [
                *("--data", "synthetic", "--n-train", "200", "--n-test", "100"),
                *("--hidden", "8", "--pretrain-epochs", "2", "--finetune-epochs", "1"),
                *("--samples", "3", "--quiet", "--out", str(tmp_path / "out")),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert report["data"] == "synthetic" and report["converted_layers"] == ["head"]
    assert report["body_max_abs_change"] == 0.0
    assert report["trainable_parameters"] == 2 * (8 * 10 + 10)  # mu and rho of the head
    for name in ("plain", "bayesian_head"):
        s = report[name]
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["ece"] <= 1 and s["nll"] > 0
    for values in report["ood_auroc"].values():
        assert all(0 <= v <= 1 for v in values.values())
    assert (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "out" / "finetune" / "metrics.jsonl").is_file()
