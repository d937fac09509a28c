"""The compact export of a pruned network (issue 5): bbb.save_compact / bbb.load_compact and
`bbb prune --export` / `bbb evaluate --compact`."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bbb
from bbb.cli import main
from bbb.models import bayes_mlp
from bbb.nn import BayesConv2d, BayesLinear


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Bayesian layers, a deterministic one (saved whole) and a Bayesian layer left unpruned
    return nn.Sequential(
        BayesConv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 20), BayesLinear(20, 5)
    )


def _same_network(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with bbb.sampling(a, "mean"), bbb.sampling(b, "mean"):
        assert torch.equal(a(x), b(x))
    for mode_seed in (1, 2):  # sampled networks: the same noise gives the same outputs
        torch.manual_seed(mode_seed)
        ya = a(x)
        torch.manual_seed(mode_seed)
        assert torch.equal(ya, b(x))
    assert torch.equal(bbb.kl_divergence(a), bbb.kl_divergence(b))


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_pruned_model_round_trips_exactly_and_is_smaller(tmp_path: Path, per_layer: bool) -> None:
    model = _model()
    bbb.prune_by_snr(model[:1], 0.9, per_layer=per_layer)  # the conv layer only
    path = tmp_path / "c.pt"
    size = bbb.save_compact(model, path)
    assert size == path.stat().st_size
    other = _model()
    for p in other.parameters():
        nn.init.normal_(p)  # nothing of the fresh model's own values may survive the load
    bbb.load_compact(other, path)
    _same_network(model, other, torch.randn(3, 1, 8, 8))
    assert other[0].weight_mask is not None and other[3].weight_mask is None
    assert torch.equal(other[0].weight_mask, model[0].weight_mask)
    assert torch.equal(other[2].weight, model[2].weight)  # the deterministic layer, whole


def test_the_export_keeps_only_the_kept_weights(tmp_path: Path) -> None:
    """At 95% removed, a 784-400-400-10 network's file holds ~5% of the weights (4 bytes each
    for index, mu and rho, against 8 for mu and rho in the state dict: ~1/13 of it)."""
    torch.manual_seed(0)
    model = bayes_mlp(784, [400, 400], 10)
    result = bbb.prune_by_snr(model, 0.95)
    buf = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if "mask" not in k}, buf)
    dense = len(buf.getvalue())
    kept = result.total - result.removed
    size = bbb.save_compact(model, tmp_path / "c.pt")
    # index + mu + rho of the kept weights, the biases' mu and rho (810 each), the priors'
    # buffers and the pickle's overhead (a few kB)
    assert 12 * kept < size < 12 * kept + 8 * 810 + 20000
    assert size < dense / 10


def test_load_compact_names_a_missing_foreign_corrupt_or_mismatched_file(tmp_path: Path) -> None:
    model = _model()
    bbb.prune_by_snr(model, 0.5)
    with pytest.raises(FileNotFoundError, match="compact export .*nope.pt does not exist"):
        bbb.load_compact(model, tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="is not a compact export \\(torch.load could not"):
        bbb.load_compact(model, tmp_path / "text.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")  # a state dict, not an export
    with pytest.raises(
        ValueError, match=re.escape("is not a compact export (format 'bbb-compact-2')")
    ):
        bbb.load_compact(model, tmp_path / "state.pt")
    path = tmp_path / "c.pt"
    bbb.save_compact(model, path)
    blob = torch.load(path, weights_only=True)
    blob["layers"]["0"]["index"][0] = 10**6  # beyond the layer's 36 weights
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="layer '0': corrupt entry"):
        bbb.load_compact(model, tmp_path / "bad.pt")
    wider = nn.Sequential(
        BayesConv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 20), BayesLinear(20, 5)
    )
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight_mu"):
        bbb.load_compact(wider, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match="is not a compact export"):
        bbb.load_compact(model, tmp_path / "cut.pt")


def test_cli_prune_export_then_evaluate_compact(tmp_path: Path) -> None:
    """`bbb prune --export` writes the compact file and reports its size; `bbb evaluate
    --compact` evaluates those weights in the run's architecture with the pruned network's
    numbers (same seed), into eval-compact-val.json (the run's eval files untouched)."""
    run = tmp_path / "run"
    assert main(["train", "--dataset", "toy", "--epochs", "1", "--out", str(run)]) == 0
    export = tmp_path / "p.pt"
    common = ["--split", "val", "--num-samples", "4"]
    assert main(["prune", str(run), "--fraction", "0.9", *common, "--export", str(export)]) == 0
    pruned = json.loads((run / "prune-0.9-val.json").read_text())
    assert pruned["pruned"]["export_bytes"] == export.stat().st_size
    assert pruned["pruned"]["export_bytes"] < pruned["pruned"]["dense_state_bytes"] / 3
    assert main(["evaluate", str(run), "--compact", str(export), *common]) == 0
    compact = json.loads((run / "eval-compact-val.json").read_text())
    assert compact["compact"] == str(export)
    assert compact["metrics"] == pruned["metrics"]
    assert not (run / "eval-val.json").exists()
    assert main(["prune", str(run), *common, "--export", str(tmp_path / "no" / "p.pt")]) == 1
