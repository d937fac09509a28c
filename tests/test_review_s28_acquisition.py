"""Session 28 review of ``bbb.acquisition`` (issue #3): half-precision scores, BatchBALD on
bfloat16 probabilities and against a brute-force greedy search, shuffling DataLoaders that
were taken for a fixed order, aliased indices in ``joint_mutual_information``, batch
normalisation in training mode under BatchBALD, and infinite scores. Each regression test
here failed before the fix it names."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import bbb
from bbb.acquisition import CLASSIFICATION_ACQUISITIONS, select


def _model(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, out))
    for layer in bbb.bayes_modules(model):  # wide posteriors: the scores differ
        layer.weight_rho.data.fill_(0.0)
    return model.eval()


def _pool(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------ half-precision predictions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_of_a_confident_input_are_finite_and_match_float32(
    dtype: torch.dtype,
) -> None:
    # input 0: the samples disagree completely; input 1: both are one-hot on class 0, whose
    # entropy is 0 log 0 = 0. In float16 the entropy's clamp 1e-30 underflowed to 0: NaN,
    # which select then refused as "a diverged model".
    sp = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    half = bbb.ClassificationPrediction(sp.mean(0).to(dtype), sp.to(dtype))
    full = bbb.ClassificationPrediction(sp.mean(0), sp)
    for method in CLASSIFICATION_ACQUISITIONS:
        if method == "random":
            continue
        got = bbb.acquisition_scores(half, method)
        assert got.dtype == torch.float32, method
        torch.testing.assert_close(got, bbb.acquisition_scores(full, method))
    assert select(bbb.acquisition_scores(half, "entropy"), 2).indices.tolist() == [0, 1]


def test_random_scores_of_a_bfloat16_pool_do_not_tie_to_its_first_inputs() -> None:
    # bfloat16 holds about 1000 values in [0, 1): of 20000 inputs ~80 shared the top value
    # 1 - 2^-8, and select broke the tie to the lowest index, so k = 10 "random" picks all
    # lay in the pool's first few hundred inputs. Drawn in float32 the picks are uniform: the
    # mean of 10 uniform indices of 20000 has standard error 20000 / sqrt(12 * 10) ~ 1826,
    # so 10000 -+ 4 standard errors holds it (before: about 300).
    n = 20000
    sp = torch.full((2, n, 2), 0.5, dtype=torch.bfloat16)
    pred = bbb.ClassificationPrediction(sp.mean(0), sp)
    scores = bbb.acquisition_scores(pred, "random", generator=torch.Generator().manual_seed(0))
    assert scores.dtype == torch.float32
    assert scores.unique().numel() > n - 50  # float32: 2^24 values, few collisions
    picks = select(scores, 10).indices.double()
    assert abs(float(picks.mean()) - n / 2) < 4 * n / math.sqrt(12 * 10)


def test_half_precision_regression_scores_do_not_overflow() -> None:
    # sample means +-300 in float16: their variance 90000 exceeds float16's 65504 (was inf)
    means = torch.tensor([[[300.0]], [[-300.0]]], dtype=torch.float16)
    pred = bbb.RegressionPrediction(means, torch.ones_like(means))
    torch.testing.assert_close(bbb.acquisition_scores(pred, "epistemic"), torch.tensor([90000.0]))
    torch.testing.assert_close(bbb.acquisition_scores(pred, "variance"), torch.tensor([90001.0]))


# ------------------------------------------------------------------------ BatchBALD


def test_batch_bald_accepts_bfloat16_softmax_output() -> None:
    # a bfloat16 model's softmax rows sum to 1 only to within ~1e-2: refused before as "not
    # probabilities ... for logits pass torch.softmax". Now renormalised in float64: the
    # picks equal those from the same probabilities renormalised by hand.
    logits = torch.randn(6, 8, 5, generator=torch.Generator().manual_seed(2))
    sp = torch.softmax(logits, -1).to(torch.bfloat16)
    sums = sp.double().sum(-1)
    assert float((sums - 1).abs().max()) > 1e-3  # the case that was refused
    got = bbb.batch_bald(sp, 4)
    want = bbb.batch_bald(sp.double() / sums.unsqueeze(-1), 4)
    assert got.indices.tolist() == want.indices.tolist()
    torch.testing.assert_close(got.mutual_information, want.mutual_information)
    with pytest.raises(ValueError, match=r"summing to 1.*got sums from"):
        bbb.batch_bald(sp * 1.1, 1)  # beyond bfloat16's rounding: still refused


def _joint_mi(sp: torch.Tensor, idx: list[int]) -> float:
    """I[y_idx; w] by enumerating every label configuration (float64)."""
    s, _, c = sp.shape
    joint = 0.0
    for labels in itertools.product(range(c), repeat=len(idx)):
        p_s = torch.ones(s, dtype=torch.float64)
        for i, y in zip(idx, labels, strict=True):
            p_s = p_s * sp[:, i, y]
        p = float(p_s.mean())
        joint -= p * math.log(p) if p > 0 else 0.0
    expected = sum(float(-torch.special.xlogy(sp[:, i], sp[:, i]).sum(-1).mean()) for i in idx)
    return joint - expected


@pytest.mark.parametrize("seed", range(6))
def test_exact_batch_bald_is_the_brute_force_greedy_choice(seed: int) -> None:
    # checked correct (no fix; a property against brute force): tiny pools, some with
    # one-hot samples (0 log 0 and configurations of probability 0)
    # and a duplicated input: each pick's joint MI equals the best brute-force extension of
    # the picks before it, and no index repeats (k = B picks the whole pool)
    g = torch.Generator().manual_seed(seed)
    s, b, c = 3 + seed % 3, 4, 2 + seed % 2
    sp = torch.softmax(3 * torch.randn(s, b, c, generator=g, dtype=torch.float64), -1)
    if seed % 2 == 0:
        sp = nn.functional.one_hot(sp.argmax(-1), c).double()
    sp[:, 1] = sp[:, 0]
    res = bbb.batch_bald(sp, b, num_configurations=10**6)
    picks = res.indices.tolist()
    assert sorted(picks) == list(range(b)) and bool(res.exact.all())
    for n in range(b):
        best = max(_joint_mi(sp, picks[:n] + [i]) for i in range(b) if i not in picks[:n])
        assert _joint_mi(sp, picks[: n + 1]) == pytest.approx(best, abs=1e-10)
        assert float(res.mutual_information[n]) == pytest.approx(best, abs=1e-10)


def test_joint_mutual_information_refuses_a_negative_alias_of_another_index() -> None:
    # [0, -3] of 3 inputs names input 0 twice: it passed as distinct and was scored as two
    # labels of input 0
    sp = torch.softmax(torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(ValueError, match=r"distinct.*got \[0, -3\], inputs \[0, 0\]"):
        bbb.joint_mutual_information(sp, [0, -3])
    # a negative index that names another input is still accepted
    assert bbb.joint_mutual_information(sp, [0, -1]) == pytest.approx(
        bbb.joint_mutual_information(sp, [0, 2])
    )


# ------------------------------------------------------------------------- acquire


def test_acquire_refuses_a_batch_sampler_over_a_random_sampler() -> None:
    # DataLoader(batch_sampler=BatchSampler(RandomSampler(...))) keeps a SequentialSampler
    # as its .sampler, so the shuffle went unseen: indices into a random order, silently
    model, pool = _model(), _pool()
    ds = TensorDataset(pool)
    loader = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, drop_last=False))
    with pytest.raises(ValueError, match=r"BatchSampler over RandomSampler.*shuffle=False"):
        bbb.acquire(model, loader, 2)


def test_acquire_refuses_a_shuffling_distributed_sampler() -> None:
    model, pool = _model(), _pool()
    ds = TensorDataset(pool)
    shuffled = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True)
    with pytest.raises(ValueError, match=r"DistributedSampler\(shuffle=True\)"):
        bbb.acquire(model, DataLoader(ds, batch_size=4, sampler=shuffled), 2)
    # in a fixed order it is a pool like any other: the tensor pool's picks
    fixed = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    loader = DataLoader(ds, batch_size=4, sampler=fixed, generator=torch.Generator())
    torch.manual_seed(3)
    got = bbb.acquire(model, loader, 3, num_samples=8, batch_size=10)
    torch.manual_seed(3)
    want = bbb.acquire(model, pool, 3, num_samples=8)
    assert got.indices.tolist() == want.indices.tolist()


def test_acquire_names_the_keys_of_a_dict_batch() -> None:
    model, pool = _model(), _pool()
    with pytest.raises(TypeError, match=r"got dict with keys \['label', 'x'\].*batch\[key\]"):
        bbb.acquire(model, [{"x": pool, "label": torch.zeros(10)}], 2)
    # the remedy the message names works
    loader = [{"x": pool[:6]}, {"x": pool[6:]}]
    torch.manual_seed(4)
    got = bbb.acquire(model, (batch["x"] for batch in loader), 3, num_samples=4)
    torch.manual_seed(4)
    assert got.indices.tolist() == bbb.acquire(model, pool, 3, num_samples=4).indices.tolist()


def test_batch_bald_refuses_batch_norm_in_training_mode_and_leaves_its_statistics() -> None:
    # in training mode batch normalisation normalises each input by its chunk's statistics
    # (no one network per weight sample) and updated its running statistics with the pool's
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 8), nn.BatchNorm1d(8), bbb.BayesLinear(8, 3))
    model.train()
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"batch normalisation '1' is in training mode"):
        bbb.acquire(model, _pool(), 2, method="batch_bald", num_samples=4)
    assert torch.equal(model[1].running_mean, before) and model.training
    model.eval()
    res = bbb.acquire(model, _pool(), 2, method="batch_bald", num_samples=4)
    assert len(set(res.indices.tolist())) == 2


def test_acquire_refuses_infinite_scores() -> None:
    # finite sample means of order 1e25: their variance overflows float32, and the inf
    # scores were ranked first (equal ones to the lowest index), silently
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(2, 1))
    with torch.no_grad():
        model[0].weight_mu.zero_()
        model[0].weight_rho.fill_(1e25)  # sigma = softplus(1e25) = 1e25
    pool = torch.ones(3, 2)
    for method in ("variance", "epistemic"):
        with pytest.raises(ValueError, match=r"3 of 3 .* scores are infinite.*index 0"):
            bbb.acquire(model, pool, 1, method=method, likelihood=bbb.Gaussian(), num_samples=3)
    # the same model in float64 scores them (the remedy the message names)
    got = bbb.acquire(
        model.double(), pool.double(), 1, method="epistemic", likelihood=bbb.Gaussian()
    )
    assert bool(torch.isfinite(got.pool_scores).all())


def test_acquire_restores_the_sampling_mode_when_the_model_raises() -> None:
    # checked correct (no fix): the layers' modes and frozen samples come back after an
    # exception in the second chunk, for the shared-sample and the BatchBALD contexts
    class FailsOnSecondCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = bbb.BayesLinear(4, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("second chunk")
            return self.layer(x)

    model = FailsOnSecondCall()
    for method in ("bald", "batch_bald"):
        model.calls = 0
        with pytest.raises(RuntimeError, match="second chunk"):
            bbb.acquire(model, _pool(), 2, method=method, batch_size=5, num_samples=2)
        assert model.layer.mode == "sample" and model.layer._frozen is None
        assert model.training  # acquire leaves the train/eval mode alone
