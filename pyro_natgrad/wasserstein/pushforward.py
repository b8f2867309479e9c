"""The pushforward (sampling-map) metric of a reparameterized distribution.

For z = T_θ(ε), ε ~ p(ε), the metric G(θ) = E_ε[J_θ(ε)ᵀ J_θ(ε)] with J = ∂T_θ(ε)/∂θ is the
squared length of the displacement field a change of θ induces, so ½δᵀGδ bounds W₂²(q_θ, q_{θ+δ})
to second order; it equals the Wasserstein information matrix when that displacement is a gradient
field (always in one dimension, and for location-scale families), and upper-bounds it otherwise
(Li & Montúfar 2018, "Natural gradient via optimal transport"; Arbel, Gretton, Li & Montúfar 2020,
"Kernelized Wasserstein natural gradient", §2). Estimated with S reparameterized draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

from ..fisher.autodiff import gram_mvp, jacobian


class PushforwardMetric:
    """G = E[JᵀJ] over the sites of one group, each site's draws weighted by its ELBO scale.

    ``framed``: in q's frame, G = E[JᵀV⁻¹J] with V the per-element variance of q's draws (the
    transport cost |V^-½(z' − z)|², measured in q's own standard deviations: a dimensionless
    metric, E[JᵀV⁻¹J] = diag(1/σ², 1) in (m, log σ) for a location-scale site, half its Fisher
    on the scale). ``frames`` holds each site's standard deviations (ones when not framed; an
    element whose draws do not vary keeps 1)."""

    def __init__(self, sites: Sequence[tuple[Distribution, float]], leaves: Sequence[Tensor],
                 num_samples: int, framed: bool = False):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for fn, _ in sites:
            if not fn.has_rsample:
                raise ValueError(f"{type(fn).__name__} has no reparameterized sampler (rsample): "
                                 "it has no pushforward Wasserstein metric")
        self.leaves = list(leaves)
        self.num_samples = num_samples
        draws = [fn.rsample((num_samples,)) for fn, _ in sites]
        self.frames = [_draw_frame(z) if framed else torch.ones_like(z[0]) for z in draws]
        self.z = torch.cat([(scale ** 0.5 * z / frame).reshape(-1)
                            for z, frame, (_, scale) in zip(draws, self.frames, sites,
                                                            strict=True)])

    def dense(self) -> Tensor:
        j = jacobian(self.z, self.leaves)
        return j.T @ j / self.num_samples

    def diag(self) -> Tensor:
        return jacobian(self.z, self.leaves).square().sum(0) / self.num_samples

    def mvp(self, v: Tensor) -> Tensor:
        """G v = E[Jᵀ(J v)] without forming J."""
        return gram_mvp(self.z, self.leaves, v) / self.num_samples


def _draw_frame(z: Tensor) -> Tensor:
    """Per-element standard deviation of draws ``z`` (leading dimension), detached; 1 where the
    draws do not vary or are not finite."""
    sd = z.detach().std(0, correction=0)
    return torch.where(torch.isfinite(sd) & (sd > 0), sd, torch.ones_like(sd))
