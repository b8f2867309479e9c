"""A variational autoencoder (an amortized guide) fitted by NaturalGradient and by Pyro's Adam:
``python -m benchmarks.vae [--quick] [--seeds 3] [--steps 800]``.

scikit-learn's 8×8 digits, binarized at half intensity: 1,500 images to fit, the other 297 held
out. Encoder 64 → 128 (softplus) → (loc, softplus scale) of an 8-dimensional z ~ N(0, I); decoder
8 → 128 (softplus) → 64 Bernoulli logits. Minibatches of 128 (the same draws for every
optimizer), ``Trace_ELBO()`` with one particle, one torch thread, float32 (Pyro's default). The
fits of one seed run side by side, their steps interleaved (the order rotating every step), each
``svi.step`` timed whole. NaturalGradient steps the encoder's weights by the closed-form Fisher
of q(z | x) pulled back through the network (CG, a Jacobian–vector product and a vector–Jacobian
product per iteration) and the decoder's, a model's params, by its base Adam (lr 0.01); Adam
steps all of them. Reported: held-out −ELBO per image (20 draws per image) at checkpoints, the
median step time and its ratio to Adam's, and the seconds of steps each fit took to come within
0.1 nats per image of the best Adam's final value. Writes ``benchmarks/results/vae.md``
(``--quick``: ``results/quick/vae.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from sklearn.datasets import load_digits
from torch import nn

from pyro_natgrad import NaturalGradient, record_args

RESULTS = Path(__file__).resolve().parent / "results"
LATENT, HIDDEN, BATCH, HELD_OUT = 8, 128, 128, 297
ADAM_LRS = (1e-3, 1e-2, 3e-2)
TOL = 0.1  # nats per image


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held out) binarized 8×8 digits, float32 (n, 64)."""
    x = (torch.tensor(load_digits().data, dtype=torch.float32) / 16 > 0.5).float()
    return x[:-HELD_OUT], x[-HELD_OUT:]


def vae(name: str) -> tuple:
    """(model, guide) of a freshly initialised VAE whose modules are registered under ``name``
    (so that fits side by side share one param store without sharing params)."""
    encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 64))

    def model(x):
        pyro.module(name + "_decoder", decoder)
        with pyro.plate("images", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module(name + "_encoder", encoder)
        loc, raw = encoder(x).split(LATENT, -1)
        with pyro.plate("images", len(x)):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))

    return model, record_args(guide)


def _adam(lr: float, guide) -> Adam:
    return Adam({"lr": lr})


def run_seed(seed: int, steps: int, marks: list[int], fit: torch.Tensor,
             held_out: torch.Tensor) -> dict[str, dict]:
    """Every optimizer's fit of one seed, steps interleaved; per optimizer the step seconds and
    the held-out −ELBO per image at ``marks``."""
    pyro.clear_param_store()
    fits = {}
    makers = {"NaturalGradient": NaturalGradient,
              **{f"Adam(lr={lr:g})": partial(_adam, lr) for lr in ADAM_LRS}}
    for i, (label, make) in enumerate(makers.items()):
        torch.manual_seed(seed)  # the same initial networks for every optimizer
        model, guide = vae(f"f{i}")
        svi = SVI(model, guide, make(guide), Trace_ELBO())
        with torch.no_grad():
            svi.evaluate_loss(fit[:BATCH])  # creates the params
        fits[label] = {"svi": svi, "seconds": [], "losses": []}
    batches = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    labels = list(fits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            batch = fit[torch.randint(len(fit), (BATCH,), generator=batches)]
            k = step % len(labels)
            for label in labels[k:] + labels[:k]:
                start = time.perf_counter()
                fits[label]["svi"].step(batch)
                fits[label]["seconds"].append(time.perf_counter() - start)
            if step in marks:
                for label in labels:
                    svi = fits[label]["svi"]
                    with torch.no_grad():
                        loss = statistics.fmean(svi.evaluate_loss(held_out) for _ in range(20))
                    fits[label]["losses"].append(loss / len(held_out))
    return fits


def seconds_to(fit: dict, marks: list[int], target: float) -> float:
    """Step seconds up to the first mark whose loss is within TOL of ``target`` (inf if none)."""
    for mark, loss in zip(marks, fit["losses"], strict=True):
        if loss <= target + TOL:
            return sum(fit["seconds"][:mark])
    return float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (20 if args.quick else 800)
    out = args.out or RESULTS / ("quick" if args.quick else "") / "vae.md"
    marks = sorted({m for m in (25, 50, 100, 200, 400, 800, 1600) if m < steps} | {steps})
    torch.set_num_threads(1)
    started = time.time()
    fit, held_out = digits()
    runs = [run_seed(seed, steps, marks, fit, held_out) for seed in range(seeds)]
    labels = list(runs[0])
    final = {label: statistics.median(r[label]["losses"][-1] for r in runs) for label in labels}
    step_time = {label: statistics.median(statistics.median(r[label]["seconds"]) for r in runs)
                 for label in labels}
    best_adam = min((k for k in labels if k.startswith("Adam")), key=final.get)
    target = final[best_adam]
    lines = ["# A variational autoencoder: NaturalGradient vs Adam", "",
             f"`python -m benchmarks.vae{' --quick' if args.quick else ''}` "
             f"({(time.time() - started) / 60:.1f} min)", "", "## Protocol", "",
             *(f"* {line}" for line in (
                 f"{len(fit)} binarized 8×8 digits (scikit-learn) to fit, {HELD_OUT} held out; "
                 f"encoder 64 → {HIDDEN} → 2×{LATENT}, decoder {LATENT} → {HIDDEN} → 64 "
                 f"Bernoulli; minibatches of {BATCH}, `Trace_ELBO()`, float32.",
                 f"{seeds} seed(s), {steps} steps; per seed every fit starts from the same "
                 "networks and sees the same minibatches, steps interleaved; one torch thread.",
                 "NaturalGradient: library defaults; Adam: `pyro.optim.Adam`, lr "
                 f"{', '.join(f'{lr:g}' for lr in ADAM_LRS)}.",
                 "Held-out −ELBO per image: mean of 20 one-draw estimates; medians over seeds. "
                 f"Seconds to target: step time until the first checkpoint within {TOL} nats "
                 f"per image of the best Adam's final value ({target:.2f}; — if never).",
                 f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                 f"{platform.python_version()}, torch {torch.__version__}, pyro "
                 f"{pyro.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load average at the "
                 f"start {os.getloadavg()[0]:.1f}.")),
             "", "## Results", "",
             "| optimizer | " + " | ".join(f"−ELBO @ {m}" for m in marks)
             + f" | step ms | step / {best_adam}'s | seconds to target |",
             "|---|" + "---:|" * (len(marks) + 3)]
    for label in labels:
        losses = [statistics.median(r[label]["losses"][i] for r in runs)
                  for i in range(len(marks))]
        to = statistics.median(seconds_to(r[label], marks, target) for r in runs)
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in losses)
                     + f" | {1e3 * step_time[label]:.1f} | "
                     f"{step_time[label] / step_time[best_adam]:.1f} | "
                     + ("—" if to == float("inf") else f"{to:.1f}") + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
