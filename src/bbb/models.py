"""Ready-made networks: Bayesian and deterministic MLPs, a small Bayesian convnet."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from .nn.conv import BayesConv2d
from .nn.linear import BayesLinear
from .nn.module import _is_int
from .priors import Prior

__all__ = ["METHODS", "Standardize", "bayes_convnet", "bayes_mlp", "count_parameters", "mlp"]

METHODS = ("bbb", "sgd", "dropout")


class Standardize(nn.Module):
    """``(x - mean) / std`` with the statistics stored as buffers (saved with the model)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _layer_sizes(fn: str, in_features: object, hidden: object, out_features: object) -> list[int]:
    """``[in_features, *hidden, out_features]`` as ints, or a ValueError naming ``fn`` and the
    bad size: a width of 0 built a network whose output ignores its input (``mlp``), an int
    for ``hidden`` failed with ``Value after * must be an iterable`` and a string was read one
    character per layer."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
        raise ValueError(
            f"{fn}: hidden must be a sequence of layer widths such as [400, 400] (or [] for "
            f"none), got {hidden!r}"
        )
    named = [("in_features", in_features)]
    named += [(f"hidden[{i}]", h) for i, h in enumerate(list(hidden))]
    named.append(("out_features", out_features))
    for name, value in named:
        if not _is_int(value) or int(value) < 1:  # type: ignore[call-overload]
            raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return [int(v) for _, v in named]  # type: ignore[call-overload]


def bayes_mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    prior: Prior | None = None,
    estimator: str = "reparam",
    kl: str = "auto",
    mu_init: str | tuple[float, float] = "fan_in",
    rho_init: float | tuple[float, float] = (-5.0, -4.0),
) -> nn.Sequential:
    """in -> [BayesLinear -> ReLU] * len(hidden) -> BayesLinear -> out (logits or means).

    ``mu_init`` defaults to ``"fan_in"`` here, as for :class:`~bbb.config.TrainConfig` (a bare
    :class:`~bbb.nn.BayesLinear` defaults to ``"paper"``, U(-0.2, 0.2)): with it a
    784-400-400-10 network reached 3% MNIST validation error in 650 steps against 850 with
    ``"paper"`` (issue 8, ``benchmarks/time_to_accuracy.py --eval-every 50``).
    """
    sizes = _layer_sizes("bayes_mlp", in_features, hidden, out_features)[:-1]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [
            BayesLinear(
                a, b, prior=prior, estimator=estimator, kl=kl, mu_init=mu_init, rho_init=rho_init
            ),
            nn.ReLU(),
        ]
    layers.append(
        BayesLinear(
            sizes[-1],
            out_features,
            prior=prior,
            estimator=estimator,
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
        )
    )
    return nn.Sequential(*layers)


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, *, dropout: float = 0.0
) -> nn.Sequential:
    """Deterministic baseline: in -> [Linear -> ReLU (-> Dropout)] * len(hidden) -> Linear."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    sizes = _layer_sizes("mlp", in_features, hidden, out_features)[:-1]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)


def bayes_convnet(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    channels: tuple[int, int] = (16, 32),
    image_size: int = 28,
    prior: Prior | None = None,
    estimator: str = "reparam",
    kl: str = "auto",
) -> nn.Sequential:
    """Two Bayesian 3x3 conv layers (each ReLU + 2x2 max-pool) and a Bayesian linear head.

    ``image_size``: the side of the (square) input images, at least 4 (the two pools halve it
    twice, rounding down).
    """
    if not _is_int(image_size) or image_size < 4:
        raise ValueError(
            f"image_size must be an integer of at least 4 (two 2x2 max-pools), got {image_size!r}"
        )
    if (
        isinstance(channels, (str, bytes))
        or not isinstance(channels, Sequence)
        or len(channels) != 2
        or not all(_is_int(c) and c >= 1 for c in channels)
    ):
        raise ValueError(
            "bayes_convnet: channels must be two positive integers (the two conv layers' "
            f"widths), got {channels!r}"
        )
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"bayes_convnet: {name} must be a positive integer, got {value!r}")
    c1, c2 = (int(c) for c in channels)
    side = int(image_size) // 4
    kw = {"prior": prior, "estimator": estimator, "kl": kl}
    return nn.Sequential(
        BayesConv2d(in_channels, c1, 3, padding=1, **kw),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.MaxPool2d(2),
        BayesConv2d(c1, c2, 3, padding=1, **kw),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        BayesLinear(c2 * side * side, num_classes, mu_init="fan_in", **kw),  # type: ignore[arg-type]
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
