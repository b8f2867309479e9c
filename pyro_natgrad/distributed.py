"""Data-parallel SVI under :mod:`torch.distributed`: each rank computes the ELBO gradient on its
shard of the data, the gradients are averaged across ranks, and every rank takes the same step.

Convention (``op="mean"``, as in ``DistributedDataParallel``): each rank's loss estimates the
*full-data* loss, its shard's log-likelihood scaled by N / n_r (``pyro.plate("data", N,
subsample=shard)`` does this). With shards that partition the data into equal sizes n = N / R the
mean of the R gradients is the full-data gradient,

    (1/R) Σ_r ∇[KL(q ‖ p) − (N/n) Σ_{i∈r} E_q log p(x_i|z)] = ∇[KL(q ‖ p) − Σ_i E_q log p(x_i|z)],

for the same guide draws. ``op="sum"`` is for losses written as each rank's share of the full one.

Every rank then takes the identical step, because a step depends only on the params and the
reduced gradient: the closed-form Fisher, the natural-parameter and Bures–Wasserstein steps and the
adaptive step size need no communication. The exception is random draws inside the step (Monte
Carlo Fisher, pushforward metric), which agree when the ranks' RNG states agree. Two ways:

* seed every rank alike (``pyro.set_rng_seed(s)``): the ELBO's guide draws agree too, so R ranks
  reproduce a 1-process run on the full data with the same draws;
* seed ranks differently (R× the particles per step) and pass ``rng_seed``: the wrapped step runs
  on a forked RNG seeded with ``rng_seed + call count``, the same on every rank.

Failures: a rank that fails while the others wait in a collective would leave them blocked until
the process group's timeout. Every call of :class:`DistributedOptim` therefore starts with one
small all-reduce of a status vector (which ranks failed, whether any asked to stop or holds a new
set of params, and a value to average); a rank that fails calls :meth:`DistributedOptim.agree`
with ``failed=True`` in place of its next call, and every other rank raises
:class:`RankFailedError` at that point. :func:`~pyro_natgrad.fit` does this on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim
from torch import Tensor

from .guides import named_params

__all__ = ["DistributedOptim", "RankFailedError", "all_reduce_gradients", "broadcast_params",
           "world_size"]

_OPS = ("mean", "sum")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group``; 1 when :mod:`torch.distributed` is not initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gradients(params: Iterable[Tensor], op: str = "mean",
                         group: dist.ProcessGroup | None = None) -> None:
    """Replaces every param's ``.grad`` by its mean (or sum) over the ranks of ``group``.

    Params are matched across ranks by param-store name (SVI hands over a *set*, whose order differs
    between processes); a missing ``.grad`` counts as zeros; one all-reduce per (device, dtype).
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    size = world_size(group)
    if size == 1:
        return
    for bucket in _buckets(_by_name(params)):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if op == "mean":
            flat /= size
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad = g.view_as(p)


def broadcast_params(params: Iterable[Tensor] | None = None, src: int = 0,
                     group: dist.ProcessGroup | None = None) -> bool:
    """Makes the params (default: the whole param store) equal to rank ``src``'s, in place.

    Returns True when they already were equal on every rank. Raises when the ranks hold different
    sets of param names (their models or guides differ).
    """
    if params is None:
        params = [p for _, p in pyro.get_param_store().named_parameters()]
    named = _by_name(params)
    if world_size(group) == 1:
        return True
    names = [n for n, _ in named]
    everyone: list[list[str] | None] = [None] * world_size(group)
    dist.all_gather_object(everyone, names, group=group)
    if any(other != names for other in everyone):
        raise RuntimeError(f"ranks hold different params: {everyone}")
    equal = True
    for bucket in _buckets(named):
        mine = torch.cat([p.detach().reshape(-1) for p in bucket])
        theirs = mine.clone()
        dist.broadcast(theirs, src=_global_rank(src, group), group=group)
        differs = torch.ne(mine, theirs).any().to(mine.dtype).reshape(1)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
        if bool(differs):
            equal = False
            with torch.no_grad():
                for p, v in zip(bucket, theirs.split([p.numel() for p in bucket]), strict=True):
                    p.copy_(v.view_as(p))
    return equal


class RankFailedError(RuntimeError):
    """Another rank failed (its own error is on that rank); this rank stops too."""


class DistributedOptim(PyroOptim):
    """Wraps any :class:`pyro.optim.PyroOptim` (``NaturalGradient``, ``WassersteinGradient``, Adam
    ...) for data-parallel SVI: all-reduces the params' ``.grad``, then delegates the step.

    >>> opt = DistributedOptim(NaturalGradient(guide))
    >>> svi = SVI(model, guide, opt, Trace_ELBO(num_particles=32, vectorize_particles=True))

    On its first call, and whenever the set of params changes (AutoGuides create theirs inside the
    first ``svi.step``), it checks that the ranks' params agree; if they do not (ranks initialised
    differently), rank 0's values are copied to every rank and that call takes no step, since its
    gradients were taken at different points. Attributes it lacks (``last_step``, ``summary``) are
    the wrapped optimizer's. With one process (or none initialised) it is the wrapped optimizer.

    Every call first exchanges a status with the other ranks (module docstring): a rank that
    failed makes every other rank raise :class:`RankFailedError` there, so none waits for the
    process group's timeout; a stop asked for by any rank (:meth:`request_stop`) sets
    :attr:`stop_agreed` on every rank in the same call.

    :param optim: the optimizer every rank runs.
    :param op: ``"mean"`` (each rank's loss estimates the full-data loss) or ``"sum"``.
    :param group: the process group (default: the world).
    :param rng_seed: run each step on a forked RNG seeded with ``rng_seed`` + the call count, so
        the step's random draws agree across ranks whose RNGs differ (None: the global RNG).
    """

    def __init__(self, optim: PyroOptim, *, op: str = "mean",
                 group: dist.ProcessGroup | None = None, rng_seed: int | None = None):
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"optim must be a pyro.optim.PyroOptim, got {type(optim).__name__}")
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        # no PyroOptim.__init__: every method SVI, save and load use is delegated below
        self.optim, self.op, self.group, self.rng_seed = optim, op, group, rng_seed
        self.num_calls = 0
        self._checked: list[str] | None = None
        self._stop_requested = False
        self.stop_agreed = False

    def __call__(self, params: Iterable[Tensor], *args, **kwargs) -> None:
        named = _by_name(params)
        params, names = [p for _, p in named], [n for n, _ in named]
        in_sync = True
        if self._exchange(changed=names != self._checked).changed:
            in_sync = broadcast_params(params, group=self.group)
            self._checked = names
        if in_sync:
            all_reduce_gradients(params, self.op, self.group)
            with self._rng(params):
                self.optim(params, *args, **kwargs)
        self.num_calls += 1

    def agree(self, value: float = 0.0, *, failed: bool = False) -> float:
        """One status exchange, at a point every rank reaches (it counts as a call's exchange
        for a rank that failed): returns the mean of ``value`` over the ranks. Raises
        :class:`RankFailedError` when another rank failed (with ``failed=True``, this rank's own
        failure is left to the caller to raise)."""
        return self._exchange(value=value, failed=failed).mean

    def request_stop(self) -> None:
        """Asks every rank to stop: the next status exchange sets :attr:`stop_agreed` on every
        rank (the caller clears it before a new run)."""
        self._stop_requested = True

    def finalize(self) -> bool:
        """The wrapped optimizer's ``finalize`` on gradients averaged over the ranks (every
        param of the store; call it on every rank after computing the gradient at the current
        params). True when there was nothing to finalize or the params end on a kept step."""
        self._exchange()
        params = [p for _, p in pyro.get_param_store().named_parameters()]
        all_reduce_gradients(params, self.op, self.group)
        finalize = getattr(self.optim, "finalize", None)
        return True if finalize is None else finalize()

    def _exchange(self, value: float = 0.0, *, failed: bool = False,
                  changed: bool = False) -> _Status:
        """All-reduces [failed one-hot over ranks…, stop, changed, value] (one collective)."""
        size = world_size(self.group)
        if size == 1:
            self.stop_agreed = self.stop_agreed or self._stop_requested
            self._stop_requested = False
            return _Status(value, changed)
        rank = dist.get_rank(self.group)
        status = torch.zeros(size + 3, dtype=torch.float64, device=_collective_device(self.group))
        status[rank] = float(failed)
        status[size:] = torch.tensor([float(self._stop_requested), float(changed), value])
        dist.all_reduce(status, group=self.group)
        status = status.cpu()
        others = [r for r in range(size) if status[r] > 0 and r != rank]
        if others and not failed:
            raise RankFailedError(f"rank(s) {others} of {size} failed (their error is in their "
                                  f"own output); rank {rank} stops too")
        if status[size] > 0:
            self.stop_agreed, self._stop_requested = True, False
        return _Status(float(status[size + 2]) / size, bool(status[size + 1] > 0))

    def _rng(self, params: Sequence[Tensor]) -> contextlib.AbstractContextManager:
        if self.rng_seed is None:
            return contextlib.nullcontext()
        return _seeded(self.rng_seed + self.num_calls,
                       sorted({p.device.index or 0 for p in params if p.device.type == "cuda"}))

    def __getattr__(self, name: str):
        if name == "optim":  # not yet set (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.optim, name)

    def get_state(self) -> dict:
        return {"wrapped": self.optim.get_state(), "num_calls": self.num_calls}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "wrapped" not in state:
            return self.optim.set_state(state)  # the wrapped optimizer's own (it checks it)
        self.optim.set_state(state["wrapped"])
        self.num_calls = state["num_calls"]


@dataclass
class _Status:
    mean: float  # of the ranks' values
    changed: bool  # some rank holds a new set of params


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int, devices: list[int]) -> Iterator[None]:
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _by_name(params: Iterable[Tensor]) -> list[tuple[str, Tensor]]:
    named = named_params(params)
    if any(n is None for n, _ in named):
        raise ValueError("every param must be in Pyro's param store (names match them across "
                         "ranks)")
    return sorted(named, key=lambda item: item[0])


def _buckets(named: list[tuple[str, Tensor]]) -> list[list[Tensor]]:
    """The params, in name order, grouped by (device, dtype) so each group is one flat buffer."""
    buckets: dict[tuple, list[Tensor]] = {}
    for _, p in named:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return list(buckets.values())


def _global_rank(rank: int, group: dist.ProcessGroup | None) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
