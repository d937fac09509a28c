"""Signal-to-noise ratio of weights and pruning by it (Blundell et al. 2015, section 5.1).

The SNR of a weight is |mu| / sigma. Pruning removes the weights of lowest SNR: their mask is
set to zero, so they are exactly zero in every sampling mode and leave the KL. Biases are kept.
A pruned model is saved compactly, only its kept weights, by :func:`save_compact` and read
back by :func:`load_compact`.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor, nn

from .nn.module import BayesModule, refuse_sharded

__all__ = ["snr", "prune_by_snr", "remove_pruning", "PruneResult", "save_compact", "load_compact"]


def _named_layers(model: nn.Module) -> list[tuple[str, BayesModule]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BayesModule)]
    for n, m in layers:  # FSDP shards: a rank's part of each layer (see refuse_sharded)
        refuse_sharded(m, n, "snr / prune_by_snr / save_compact")
    return layers


@torch.no_grad()
def snr(model: nn.Module) -> dict[str, Tensor]:
    """|mu| / sigma of every weight, per Bayesian layer: ``{layer name: tensor shaped like W}``.

    Biases are not included. Pruned weights have SNR 0, and so has a weight with mu = 0 whose
    sigma underflowed to 0 (rho below ~-100 in float32: always exactly zero, 0/0 otherwise NaN,
    which :func:`prune_by_snr` would rank above every other weight). Float16 and bfloat16
    layers' SNRs are computed and returned in float32 (in float16, sigma underflows to 0 below
    rho ~ -17, which made every such weight's SNR inf, ranked by position alone).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _named_layers(model):
        value = _unmasked_snr(layer)
        if layer.weight_mask is not None:
            # (not value * mask: an inf SNR times 0 was NaN)
            value = torch.where(layer.weight_mask == 0, 0.0, value)
        out[name] = value
    return out


def _unmasked_snr(layer: BayesModule) -> Tensor:
    """|mu| / sigma of the layer's weights (shape W), 0 where mu = 0 (also when sigma is 0);
    in float32 for float16/bfloat16 layers."""
    mu: Tensor = layer.weight_mu
    rho: Tensor = layer.weight_rho
    if mu.dtype in (torch.float16, torch.bfloat16):
        mu, rho = mu.float(), rho.float()
    mu = mu.abs()
    return torch.where(mu == 0, 0.0, mu / torch.nn.functional.softplus(rho))


@dataclass
class PruneResult:
    """What :func:`prune_by_snr` did."""

    fraction: float  # fraction of weights removed overall
    threshold: float  # largest SNR removed (global mode; nan per layer)
    removed: int
    total: int
    per_layer: dict[str, float]  # fraction removed in each layer


def _floor_count(fraction: float, n: int) -> int:
    """floor(fraction * n) for the decimal the user wrote: ``0.29 * 100`` is
    28.999999999999996 in floats, so the fraction is read back from its shortest repr (29/100)."""
    return math.floor(Fraction(repr(float(fraction))) * n)


def _check_fraction(fraction: object) -> float:
    """``fraction`` as a float in [0, 1), or a ValueError naming it: a real number (Python,
    NumPy or a one-element real tensor), not a bool, a string or None."""
    if isinstance(fraction, Tensor) and fraction.numel() == 1 and not fraction.is_meta:
        fraction = fraction.item()  # a bool or complex tensor's item is refused below
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):
        # float() took "0.5" silently and failed on None with a message naming no argument
        raise ValueError(
            f"fraction must be a number in [0, 1) (the share of weights to remove), got "
            f"{fraction!r} ({type(fraction).__name__})"
        )
    value = float(fraction)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {value!r}")
    return value


def _checked_scores(name: str, layer: BayesModule) -> Tensor:
    """The layer's unmasked SNRs, flattened; a ValueError for a layer on the meta device (no
    values) or with a NaN SNR (a NaN mu or rho), which has no rank."""
    shown = repr(name) if name else "(the model itself)"
    if layer.weight_mu.is_meta or layer.weight_rho.is_meta:
        raise ValueError(
            f"prune_by_snr: layer {shown} is on the meta device (shapes, no values): pruning "
            "ranks the trained weights; materialise the model first (model.to_empty(device=...)"
            " and load its weights)"
        )
    s = _unmasked_snr(layer).flatten()
    bad = int(torch.isnan(s).sum())
    if bad:
        # a NaN SNR sorted above every other, so such a weight was always kept, silently
        raise ValueError(
            f"prune_by_snr: layer {shown} has {bad} of {s.numel()} weights whose SNR "
            "|mu| / sigma is NaN (NaN in weight_mu or weight_rho): they cannot be ranked; "
            "the parameters are corrupt (a diverged training run?)"
        )
    return s


@torch.no_grad()
def prune_by_snr(model: nn.Module, fraction: float, *, per_layer: bool = False) -> PruneResult:
    """Remove the ``fraction`` of weights with the lowest SNR |mu| / sigma (in place).

    Args:
        model: a network with Bayesian layers.
        fraction: in [0, 1): the share of weights to remove (a number).
        per_layer: ``False`` (the paper): one global threshold over the weights of all Bayesian
            layers; ``True``: remove ``fraction`` of each layer's weights.

    Exactly ``floor(fraction * n)`` weights are removed (ties broken by position). Pruning again
    starts from the unpruned SNRs, so ``prune_by_snr(m, 0.5)`` then ``0.75`` removes 75%.

    Raises:
        ValueError: for a ``fraction`` that is not a number in [0, 1), a ``per_layer`` that is
            not a bool, a model without Bayesian layers, a layer on the meta device or one
            with a NaN SNR (NaN parameters); the model's masks are then left as they were.
    """
    fraction = _check_fraction(fraction)
    if per_layer not in (True, False):  # "no" or "false" would have meant per layer
        raise ValueError(f"per_layer must be True or False, got {per_layer!r}")
    layers = _named_layers(model)
    if not layers:
        raise ValueError("prune_by_snr: the model has no Bayesian layers")
    # every layer's SNRs are computed and checked before any mask changes: a refused model
    # keeps the pruning it had
    scores = {name: _checked_scores(name, layer) for name, layer in layers}
    for _, layer in layers:
        layer.weight_mask = None
    per_layer_frac: dict[str, float] = {}
    threshold = float("nan")
    if per_layer:
        for name, layer in layers:
            s = scores[name]
            k = _floor_count(fraction, s.numel())
            mask = torch.ones_like(s)
            if k:
                mask[torch.argsort(s, stable=True)[:k]] = 0
            w = layer.weight_mu
            layer.weight_mask = mask.reshape(w.shape).to(w.dtype)
            per_layer_frac[name] = k / s.numel()
    else:
        # one threshold over all layers: the scores meet on the first layer's device (a
        # model split across devices has layers on several); each mask goes back to its layer's
        home = layers[0][1].weight_mu.device
        flat = torch.cat([scores[n].to(home, torch.float64) for n, _ in layers])
        k = _floor_count(fraction, flat.numel())
        mask = torch.ones_like(flat)
        if k:
            order = torch.argsort(flat, stable=True)
            mask[order[:k]] = 0
            threshold = float(flat[order[k - 1]])
        start = 0
        for name, layer in layers:
            n = layer.weight_mu.numel()
            w = layer.weight_mu
            m = mask[start : start + n].reshape(w.shape).to(w.device, w.dtype)
            layer.weight_mask = m
            per_layer_frac[name] = int((m == 0).sum()) / n
            start += n
    total = sum(layer.weight_mu.numel() for _, layer in layers)
    removed = 0
    for _, layer in layers:
        assert layer.weight_mask is not None  # both branches above set every layer's mask
        removed += int((layer.weight_mask == 0).sum())
    return PruneResult(removed / total, threshold, removed, total, per_layer_frac)


def remove_pruning(model: nn.Module) -> None:
    """Drop every pruning mask (weights come back with their trained mu and sigma)."""
    for _, layer in _named_layers(model):
        layer.weight_mask = None


COMPACT_FORMAT = "bbb-compact-2"
# rho of a pruned weight restored by load_compact: masked, so never used while the mask is on;
# after remove_pruning the weight is mu = 0 with sigma = softplus(-30) ~ 9e-14, still ~zero
_PRUNED_RHO = -30.0


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each module of ``model``, by ``id``: a module used in several places has
    several (its state dict entries appear under each, ``named_modules`` lists it once)."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def _repeated_keys(model: nn.Module) -> dict[str, str]:
    """``{key: first key}`` for each state dict entry of ``model`` that holds the same tensor
    as an earlier entry: a module used in several places (or a prior shared by several
    layers) has its parameters and buffers under each of its names."""
    first: dict[int, str] = {}
    repeated: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state: stored under every key
        repeated_of = first.setdefault(id(value), key)
        if repeated_of != key:
            repeated[key] = repeated_of
    return repeated


def save_compact(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Save ``model`` with only the weights its pruning kept; returns the file's size in bytes.

    For every Bayesian layer with a pruning mask (:func:`prune_by_snr`), the kept weights'
    flat positions (int32 where the layer has fewer than 2^31 weights) and their mu and rho
    are stored; everything else in the state dict (biases, unpruned layers, priors'
    buffers, other modules) is stored whole; a tensor the state dict holds under several keys
    (a layer used in several places, a prior shared by layers) is stored once. The file is
    written atomically (a crash never leaves a partial file under ``path``).
    :func:`load_compact` reads it into a model of the same architecture. At 95% removed a 2 x 1200 MLP's file is ~1/13 of its state dict.
    """
    from .train.checkpoint import atomic_write_bytes
    from .train.trainer import _plain_module

    # a torch.compile wrapper: the underlying network's keys, without "_orig_mod." (the file
    # loads into the uncompiled network, as the Trainer's checkpoints do)
    model = _plain_module(model)
    repeated = _repeated_keys(model)  # load_compact fills them in from their first key
    # a module's extra state (get_extra_state: any object torch.save stores) is kept as it is
    # (was: AttributeError: 'dict' object has no attribute 'detach')
    state = {
        k: v.detach() if isinstance(v, Tensor) else v
        for k, v in model.state_dict().items()
        if k not in repeated
    }
    layers: dict[str, dict[str, object]] = {}
    for name, layer in _named_layers(model):  # a layer used in several places: its first name
        mask = layer.weight_mask
        if mask is None:
            continue  # not pruned: its mu and rho are stored whole with the rest
        p = _prefix(name)
        keep = mask.detach().reshape(-1) != 0
        n = keep.numel()
        index = keep.nonzero().reshape(-1).to(torch.int32 if n < 2**31 else torch.int64)
        layers[name] = {
            "shape": list(layer.weight_mu.shape),
            "index": index.cpu(),
            "mu": layer.weight_mu.detach().reshape(-1)[keep].cpu(),
            "rho": layer.weight_rho.detach().reshape(-1)[keep].cpu(),
        }
        for key in ("weight_mu", "weight_rho", "weight_mask"):
            state.pop(p + key, None)  # absent where another module's entry holds the tensor
    # clone: a view saved by torch.save would carry its whole storage
    rest = {k: v.cpu().clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    buf = io.BytesIO()
    # the sharing is recorded: a model built without it (its own prior per layer, a layer
    # that the saved model used twice built as two) loads the file as well (was: missing keys)
    torch.save(
        {"format": COMPACT_FORMAT, "layers": layers, "rest": rest, "repeated": repeated}, buf
    )
    atomic_write_bytes(path, buf.getvalue())
    return Path(path).stat().st_size


def dense_state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model's whole state without its pruning masks: what a
    pruned model costs when saved densely, the size :func:`save_compact` is compared with."""
    # the Bayesian layers' masks only (a key merely containing "mask", such as another
    # module's attention mask buffer, is part of the dense state)
    aliases = _aliases(model)
    masks = {
        _prefix(alias) + "weight_mask"
        for _, layer in _named_layers(model)
        for alias in aliases[id(layer)]
    }
    buf = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if k not in masks}, buf)
    return len(buf.getvalue())


def load_compact(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a :func:`save_compact` file into ``model`` (the same architecture, any device).

    The pruned layers get their masks back and their kept weights' mu and rho; a pruned
    weight's mu is 0 (the network is exactly the saved one in every sampling mode). Raises
    FileNotFoundError for a missing file, ValueError for a file that is not a compact export
    or whose index is corrupt, and ``load_state_dict``'s RuntimeError naming the keys and
    shapes when the architecture differs.
    """
    from .train.trainer import _plain_module

    model = _plain_module(model)  # a torch.compile wrapper: its network (see save_compact)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compact export {path} does not exist (or is not a file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, ...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is not None:
            # a class the weights-only load does not know (a module's extra state, saved by
            # save_compact as it is): was reported as "not a compact export"
            name = refused.group(1)
            raise ValueError(
                f"{path} holds an object of class {name} (a module's extra state?), which "
                "torch.load(weights_only=True) does not load; if you trust the file, allow "
                f"the class with torch.serialization.add_safe_globals([{name}]) and load again"
            ) from None
        raise ValueError(
            f"{path} is not a compact export (torch.load could not read it: {type(e).__name__})"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{path} is not a compact export (format {COMPACT_FORMAT!r})")
    rest, layers = blob.get("rest"), blob.get("layers")
    if not isinstance(rest, dict) or not isinstance(layers, dict):
        raise ValueError(f"{path}: corrupt compact export (no 'rest' or 'layers' table)")
    state = dict(rest)
    aliases = _aliases(model)
    for name, entry in layers.items():
        try:
            shape = [int(v) for v in entry["shape"]]
            index, mu, rho = entry["index"].long(), entry["mu"], entry["rho"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # "bbb: error: 'rho'"
            raise ValueError(
                f"{path}: layer {name!r}: corrupt entry ({type(e).__name__}: {e})"
            ) from None
        n = math.prod(shape)
        if (
            index.dim() != 1
            or mu.shape != index.shape
            or rho.shape != index.shape
            or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= n))
        ):
            raise ValueError(
                f"{path}: layer {name!r}: corrupt entry (index of {index.numel()} positions "
                f"for {n} weights, mu {tuple(mu.shape)}, rho {tuple(rho.shape)})"
            )
        full_mu = torch.zeros(n, dtype=mu.dtype)
        full_rho = torch.full((n,), _PRUNED_RHO, dtype=rho.dtype)
        mask = torch.zeros(n, dtype=mu.dtype)
        full_mu[index], full_rho[index], mask[index] = mu, rho, 1
        # a layer used in several places is stored once; its state dict has it under each
        try:
            names = aliases[id(model.get_submodule(name))]
        except AttributeError:  # another architecture: load_state_dict names the keys
            names = [name]
        for alias in names:
            p = _prefix(alias)
            state[p + "weight_mu"] = full_mu.reshape(shape)
            state[p + "weight_rho"] = full_rho.reshape(shape)
            state[p + "weight_mask"] = mask.reshape(shape)
    # a tensor under several keys of the saved model's state dict is stored under the first
    # only: filled in from the file's record of that sharing (files written before it was
    # recorded: from the target model's sharing)
    saved_repeated = blob.get("repeated", {})
    if not isinstance(saved_repeated, dict):
        raise ValueError(f"{path}: corrupt compact export ('repeated' is not a table)")
    for sharing in (saved_repeated, _repeated_keys(model)):
        for key, first in sharing.items():
            if key not in state and first in state:
                state[key] = state[first]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # another architecture: torch's message, now with the file
        raise RuntimeError(f"{path} does not fit the model: {e}") from None
