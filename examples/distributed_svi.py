"""Data-parallel SVI with the natural gradient: 2 processes on this machine, gloo over loopback.

Each rank holds every row but uses only its shard (rows rank, rank + R, ...), optionally in
mini-batches drawn by its own generator; ``pyro.plate("data", N, subsample=rows)`` scales the
shard's log-likelihood by N / len(rows), so each rank's loss estimates the full-data loss and
``DistributedOptim`` averages the gradients. Every rank is seeded alike, so the guide draws (and
the step) are identical on every rank.

    python examples/distributed_svi.py                  # 2 ranks, whole shards
    python examples/distributed_svi.py --batch-size 256 # 2 ranks, mini-batches of each shard
"""

from __future__ import annotations

import argparse
import socket

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_natgrad import NaturalGradient
from pyro_natgrad.distributed import DistributedOptim, RankFailedError

NOISE = 0.5


def make_data(n: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.linspace(-1.0, 1.0, d, dtype=torch.float64) + NOISE * torch.randn(
        n, generator=g, dtype=torch.float64)
    return X, y


def model(X: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(y), subsample=rows) as i:  # scale N / len(rows)
        pyro.sample("y", dist.Normal((X[i] * w).sum(-1), NOISE), obs=y[i])


def run(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    pyro.set_rng_seed(0)  # the same on every rank: identical guide draws and steps
    X, y = make_data(args.rows)
    shard = torch.arange(rank, args.rows, world)
    batches = torch.Generator().manual_seed(1000 + rank)  # this rank's own mini-batch stream

    guide = AutoMultivariateNormal(model)
    optim = DistributedOptim(NaturalGradient(guide))  # the one extra line
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True))
    for step in range(args.steps):
        rows = shard
        if args.batch_size:
            rows = shard[torch.randint(len(shard), (args.batch_size,), generator=batches)]
        try:
            loss = torch.tensor(svi.step(X, y, rows))
        except Exception as e:  # tell the other ranks, or they wait in the all-reduce
            if not isinstance(e, RankFailedError):
                optim.agree(failed=True)
            raise
        tdist.all_reduce(loss)  # for printing only: the mean of the ranks' estimates
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1:3d}  loss {float(loss) / world:.2f}", flush=True)

    with torch.no_grad():
        q = guide.get_posterior()
    lines: list[str | None] = [None] * world
    tdist.all_gather_object(lines, f"rank {rank}: mean {_fmt(q.mean)}  sd {_fmt(q.stddev)}")
    if rank == 0:
        cov = torch.linalg.inv(torch.eye(X.shape[1], dtype=X.dtype) + X.T @ X / NOISE**2)
        print("\n".join(lines))
        print(f"exact:  mean {_fmt(cov @ X.T @ y / NOISE**2)}  sd {_fmt(cov.diagonal().sqrt())}")
    tdist.destroy_process_group()


def _fmt(v: torch.Tensor) -> str:
    return " ".join(f"{x:+.4f}" for x in v.detach().tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=0, help="rows per rank per step "
                        "(0: the whole shard)")
    args = parser.parse_args()
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
