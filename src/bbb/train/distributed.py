"""Data-parallel training with ``torch.distributed``: set-up from torchrun, and small helpers.

``torchrun --nproc_per_node=N -m bbb train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init_from_env` turns that into a process group (``gloo`` on CPU, ``nccl`` on CUDA, one
GPU per process chosen by ``LOCAL_RANK``); without those variables (or with ``WORLD_SIZE=1``)
everything stays single-process and nothing here does anything.

How the objective stays correct under ``DistributedDataParallel`` (DDP): each rank computes
its local minibatch loss ``mean NLL over its B examples + kl_weight * KL`` with the *global*
data-set size N in the KL weight (``KL / N`` for the uniform weighting). DDP averages gradients
over the R ranks, so the gradient applied is ``(1/R) sum_r grad NLL_r + grad KL / N`` = the
gradient of the mean NLL over the global batch of ``R * B`` examples plus ``grad KL / N``: the
KL is counted exactly once, as in one process on the global batch.

The whole ELBO (network forward, likelihood, KL) runs inside the wrapped module's forward
(:class:`ELBOStep`). Why: the Bayesian layers compute their KL lazily, from ``mu``/``rho``,
after the network's forward. Outside DDP's forward that still works with the default
``find_unused_parameters=False`` (DDP's per-parameter gradient hooks fire whatever path the
gradient took), but with ``find_unused_parameters=True`` DDP searches the graph of the forward's
*outputs*, would mark a parameter reached only through the KL (``rho`` of the mean network) as
unused, and then fail when its gradient arrives. Inside the forward, the loss reaches every
parameter - the layers' ``mu`` and ``rho`` and a learned likelihood noise, which lives in the
ELBO rather than the network and must be averaged across ranks like the rest - so
``find_unused_parameters`` can stay off (it costs a graph traversal per step) and is still safe
to turn on for a model that needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..elbo import ELBO, ELBOResult

__all__ = [
    "DistributedError",
    "DistributedInterrupt",
    "DeferredStop",
    "ELBOStep",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "collective_errors",
    "env_world_size",
    "fsdp_sharded",
    "gather_object",
    "init_from_env",
    "is_distributed",
    "is_main",
    "on_main",
    "rank",
    "rank_seed",
    "refuse_fsdp",
    "unwrap",
    "world_size",
    "wrap_elbo",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed (the message names it and repeats its error), or a bad launch."""


class DistributedInterrupt(KeyboardInterrupt):
    """Another rank was stopped (Ctrl-C, or SIGTERM under ``bbb``): this rank stops with it.

    A ``KeyboardInterrupt``, so that every rank takes the path of an interrupted run (the
    ``bbb`` command's "continue the run with ..." line), not that of a failure.
    """


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes in the environment; return this rank's device.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and ``device`` is
    returned as is. Otherwise the backend is ``nccl`` for a CUDA ``device`` (this process then
    uses ``cuda:LOCAL_RANK``) and ``gloo`` for the CPU. Calling it again in a process whose
    group is already initialised just returns the device.
    """
    dev = torch.device(device)
    world = env_world_size()
    if world < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return dev
    r = _env_int("RANK", -1)
    if not 0 <= r < world:
        raise DistributedError(
            f"RANK={os.environ.get('RANK')!r} must lie in [0, WORLD_SIZE={world}): "
            "launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(
                f"WORLD_SIZE={world} but {name} is not set: launch with torchrun "
                "(or set MASTER_ADDR and MASTER_PORT yourself)"
            )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' requested but CUDA is not available")
        local = _env_int("LOCAL_RANK", 0)
        if not 0 <= local < torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                "use --nproc_per_node <= the number of GPUs"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed training supports cpu and cuda devices, got {dev}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the only rank that writes files (and always when not distributed)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks, in place; returns it (unchanged when not distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over ranks, in place; returns it (unchanged when not distributed).

    ``t`` must be a floating-point (or complex) tensor, on every process count: the mean of
    integers is not an integer, and an integer tensor was summed over the ranks in place before
    the division failed, left holding the sum.
    """
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(
            f"all_reduce_mean needs a floating-point tensor, got {t.dtype} (use all_reduce_sum, "
            "or convert it first: t.double())"
        )
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled between our own processes only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, raise on every rank.

    Without this, a rank that fails (e.g. rank 0 cannot write a checkpoint) leaves the others
    blocked in their next collective until the timeout. The failing rank re-raises its own
    exception; the others raise :class:`DistributedError` naming the rank and its message, or,
    where that rank was stopped (a ``KeyboardInterrupt``: Ctrl-C, or SIGTERM under ``bbb``),
    :class:`DistributedInterrupt`: they stop too. Any ``BaseException`` is told (a stop or a
    ``SystemExit`` used to leave the others waiting).
    """
    if not is_distributed():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = e
    messages: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
    mine = (
        None
        if error is None
        else (isinstance(error, KeyboardInterrupt), f"{type(error).__name__}: {error}")
    )
    dist.all_gather_object(messages, mine)
    if error is not None:
        raise error
    for r, msg in enumerate(messages):
        if msg is not None:
            stopped, text = msg
            if stopped:
                raise DistributedInterrupt(f"rank {r} was interrupted while {what} ({text})")
            raise DistributedError(f"rank {r} failed while {what}: {text}")


class DeferredStop:
    """Holds this rank's Ctrl-C / SIGTERM stop until every rank can take it at once.

    Under ``torch.distributed`` a rank that stops on its own, wherever the signal caught it,
    leaves the others in their next collective (a gradient all-reduce) until the backend's
    timeout (NCCL: 10-30 min; gloo fails at once when that process exits, with a "connection
    closed by peer" error). Inside ``with DeferredStop() as stop:`` (in the main thread) the
    SIGINT and SIGTERM handlers that are Python functions (``KeyboardInterrupt`` for Ctrl-C,
    the ``bbb`` command's SIGTERM handler) still run when the signal arrives, but the exception
    they raise is held; the caller exchanges :attr:`pending` with the other ranks in a
    collective it makes anyway and calls :meth:`stop` on every rank when any rank's is set:
    the stopped rank raises its own exception, the others :class:`DistributedInterrupt`. A
    signal that finds one held already raises at once (a second Ctrl-C: the way out of a
    run that does not reach its next exchange). A handler that raises nothing (``SIG_DFL``,
    ``SIG_IGN``, the ``bbb`` command's ignored repeat of one SIGTERM) is left as it is, as is
    everything outside the main thread.
    """

    def __init__(self) -> None:
        self.held: BaseException | None = None
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        """Whether a stop of this rank is held."""
        return self.held is not None

    def __enter__(self) -> DeferredStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if callable(previous):
                try:
                    signal.signal(signum, self._handler)
                except (ValueError, OSError):  # not settable here (an embedded interpreter)
                    continue
                self._previous[signum] = previous
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        try:
            self._previous[signum](signum, frame)
        except BaseException as e:
            if self.held is not None:
                raise  # a second stop: at once
            self.held = e

    def stop(self, what: str) -> None:
        """Raise the held stop, or (another rank's) :class:`DistributedInterrupt`."""
        held, self.held = self.held, None
        if held is not None:
            raise held
        raise DistributedInterrupt(f"another rank was interrupted: every rank stops {what}")

    def exchange(self, device: torch.device | str, what: str) -> None:
        """One all-reduce of the ranks' :attr:`pending`; :meth:`stop` if any is set."""
        flag = torch.tensor([1.0 if self.pending else 0.0], device=device)
        if float(all_reduce_sum(flag)) > 0:
            self.stop(what)


def on_main(fn: Callable[[], T], what: str) -> T:
    """Call ``fn`` on rank 0 only and return its result on every rank.

    Errors propagate to every rank (see :func:`collective_errors`). When not distributed this is
    just ``fn()``.
    """
    if not is_distributed():
        return fn()
    result: Any = None
    with collective_errors(what):
        if is_main():
            result = fn()
    return broadcast_object(result)


def cleanup() -> None:
    """Leave the process group (no-op when none is initialised).

    Unreachable DDP wrappers are garbage-collected first, while the group is still registered:
    a DDP reducer freed *after* the group was destroyed holds its last reference, and the gloo
    group's destructor, run from the reducer's with the GIL held, then waits for worker threads
    that may need the GIL to release a finished collective's tensors - a deadlock (seen with
    torch 2.13 on CPU).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_seed(seed: int, r: int) -> int:
    """A per-rank seed derived from a shared ``seed`` (distinct ranks get unrelated streams)."""
    # splitmix64-style mixing, so seeds s and s + 1 of neighbouring ranks do not overlap
    z = (seed + (r + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _owned_outputs(result: ELBOResult) -> ELBOResult:
    """``result`` with each of its tensors that needs a gradient and is a view of another
    tensor replaced by a copy of its own (the others, and ``result`` itself when there is
    none, as they are).

    What a view is here: the ELBO's ``output`` (S, B, ...), reshaped from the network's
    (S * B, ...) output; ``loss`` is a new scalar and ``nll``, ``kl`` are detached scalars
    (no gradient). FSDP2 hooks the tensors a sharded module returns, to gather the shards
    again before their backward; an in-place op on a returned view (``out += y``) rebuilds its
    autograd history without that hook (torch warns "returned a view tensor" at each step), so
    the copy makes such an op safe. Its cost: one tensor of the network output's size
    (S * B * output features, the size the likelihood's own intermediates already have), in
    training only: under ``torch.no_grad()`` nothing needs a gradient and nothing is copied.
    """
    changes: dict[str, Any] = {
        f.name: value.clone()
        for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), Tensor)
        and value.requires_grad
        and value._base is not None
    }
    return dataclasses.replace(result, **changes) if changes else result


class ELBOStep(nn.Module):
    """The network and its ELBO in one module, so that DDP wraps the whole objective.

    ``forward(x, y, batch_index=i, num_batches=M)`` returns ``elbo(model, x, y, ...)``, with
    no tensor that needs a gradient being a view of another (a copy of the (S, B, ...)
    ``output`` in its place while training: see :func:`_owned_outputs`), so that
    ``fully_shard(ELBOStep(model, elbo))`` returns no view and an in-place op on the result
    keeps FSDP's pre-backward hook.
    """

    def __init__(self, model: nn.Module, elbo: ELBO) -> None:
        super().__init__()
        self.model = model
        self.elbo = elbo

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_index: int | None = None,
        num_batches: int | None = None,
    ) -> ELBOResult:
        """The ELBO of the minibatch ``(x, y)`` (see :class:`bbb.ELBO`)."""
        return _owned_outputs(
            self.elbo(self.model, x, y, batch_index=batch_index, num_batches=num_batches)
        )


def fsdp_sharded(module: nn.Module) -> str | None:
    """The name of a submodule of ``module`` that FSDP shards (``fully_shard``,
    ``FullyShardedDataParallel``) or that holds ``DTensor`` parameters; ``"<root>"`` for
    ``module`` itself; None when there is none (nothing is imported to find out)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    kinds = tuple(
        k
        for k in (
            getattr(fsdp, "FSDPModule", None),
            getattr(fsdp, "FullyShardedDataParallel", None),
        )
        if isinstance(k, type)
    )
    if not kinds and dtensor is None:
        return None
    for name, m in module.named_modules():
        if (kinds and isinstance(m, kinds)) or (
            dtensor is not None and any(isinstance(p, dtensor) for p in m.parameters(recurse=False))
        ):
            return name or "<root>"
    return None


def refuse_fsdp(module: nn.Module, who: str) -> None:
    """A :class:`DistributedError` if ``module`` is sharded by FSDP (see :func:`fsdp_sharded`):
    ``who`` (the Trainer, :func:`wrap_elbo`) trains with DDP, which replicates the model."""
    name = fsdp_sharded(module)
    if name is not None:
        raise DistributedError(
            f"{who} trains a replicated model (DistributedDataParallel), but {name!r} is sharded "
            "by FSDP (fully_shard / FullyShardedDataParallel): DDP cannot wrap it, and its "
            "checkpoints would hold one rank's shards. Give it the model before sharding, or "
            "train the sharded model in a loop of your own, with the ELBO inside the FSDP "
            "root: fully_shard(bbb.train.distributed.ELBOStep(model, elbo))"
        )


#: the DistributedDataParallel arguments :func:`wrap_elbo` sets itself
_WRAP_ELBO_OWNS = frozenset(
    {"module", "device_ids", "output_device", "broadcast_buffers", "forward_sync_buffers"}
)


def check_bool_option(
    name: str, value: object, true: str, false: str = "", *, none: str | None = None
) -> None:
    """A ``ValueError`` naming ``name`` and the accepted values unless ``value`` is ``True``
    or ``False`` (or None, where ``none`` says what it means): ``true``, ``false`` and
    ``none`` say what each value does. Anything else (a string, 0 or 1, a NumPy bool) is
    refused: the Trainer and ``wrap_elbo`` took it for its truth, and ``"no"`` is true."""
    if isinstance(value, bool) or (none is not None and value is None):
        return
    accepted = [f"True ({true})", f"False ({false})" if false else "False"]
    if none is not None:
        accepted.append(f"None ({none})")
    listed = ", ".join(accepted[:-1]) + " or " + accepted[-1]
    raise ValueError(f"{name} must be {listed}, got {value!r}")


def wrap_elbo(
    model: nn.Module,
    elbo: ELBO,
    device: torch.device | str = "cpu",
    *,
    find_unused_parameters: bool = False,
    **ddp_options: Any,
) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(ELBOStep(model, elbo))`` for this rank's ``device``.

    Buffers are not broadcast at each step (``broadcast_buffers=False``): the ELBO's step
    counter, pruning masks and input statistics evolve identically on every rank.

    ``ddp_options`` go to ``DistributedDataParallel`` as they are, e.g. ``static_graph=True``,
    ``gradient_as_bucket_view=True`` or ``bucket_cap_mb=...``; the options this function sets
    itself (the module, ``device_ids``, ``output_device`` and the buffer broadcast) are refused
    with a ``TypeError`` naming them.

    Sets ``elbo.replicas`` to the world size: DDP averages the ranks' gradients, so the
    ``"blundell"`` KL weight must divide by the global batch, ``replicas * B`` (the uniform
    weight, ``KL / N``, does not depend on it).
    """
    check_bool_option(
        "find_unused_parameters",
        find_unused_parameters,
        "DDP looks for the parameters the loss did not reach, at every step",
    )
    owned = sorted(set(ddp_options) & _WRAP_ELBO_OWNS)
    if owned:
        raise TypeError(
            f"wrap_elbo sets {', '.join(owned)} itself (device_ids from device=, no buffer "
            "broadcast); pass the other DistributedDataParallel options only"
        )
    if not is_distributed():
        raise DistributedError(
            "wrap_elbo needs an initialised torch.distributed process group with more than one "
            "process (launch with torchrun)"
        )
    refuse_fsdp(model, "wrap_elbo")
    refuse_fsdp(elbo, "wrap_elbo")
    elbo.replicas = dist.get_world_size()
    dev = torch.device(device)
    ids = None
    if dev.type == "cuda":
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    ddp = nn.parallel.DistributedDataParallel
    step = ELBOStep(model, elbo)
    # ``forward_sync_buffers`` replaces ``broadcast_buffers`` in recent torch releases (2.13);
    # each is passed by name, so that it reaches its own parameter
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(
            step,
            device_ids=ids,
            find_unused_parameters=find_unused_parameters,
            forward_sync_buffers=False,
            **ddp_options,
        )
    return ddp(
        step,
        device_ids=ids,
        find_unused_parameters=find_unused_parameters,
        broadcast_buffers=False,
        **ddp_options,
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP / :class:`ELBOStep` wrapper (``module`` itself otherwise)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, ELBOStep):
        module = module.model
    return module
