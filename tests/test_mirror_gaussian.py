"""The Mirror's full-covariance Gaussian step in the Cholesky factor (families/gaussian_step.py):
the same candidates as the natural-parameter step (domain repairs, momentum, multiplicity), its
KL against torch's float64 closed form in float32, and the O(d³) operations of a whole
NaturalGradient step counted by tests/op_count.py."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from torch.distributions import kl_divergence

from pyro_natgrad import NaturalGradient
from pyro_natgrad.demo import logistic_model
from pyro_natgrad.families import MultivariateNormal
from pyro_natgrad.families.gaussian_step import smallest_eigenvalue
from pyro_natgrad.guides import Direct, Site
from pyro_natgrad.optim import HeavyBall, Mirror, PrecisionShortening, Retraction

from .op_count import count_ops

F64 = torch.float64
KEY = ("loc", "tril")


class _NaturalParameters(MultivariateNormal):
    """The same family under another name: the Mirror's generic η-path steps it."""

    name = "MultivariateNormal (natural parameters)"


def _spectrum(lowest: list[float], d: int, seed: int = 0) -> torch.Tensor:
    """Symmetric S per batch element, eigenvalues spread over [lowest, 1] in a random basis."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for low in lowest:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
        out.append(q @ torch.diag(torch.linspace(low, 1.0, d, dtype=F64)) @ q.T)
    return torch.stack(out)


def _problem(s: torch.Tensor, dtype=F64, seed: int = 1, loc_scale: float = 1.0):
    """A batch of N(m, LLᵀ) and the unconstrained params' gradients of the loss
    ⟨C, LLᵀ⟩ + gᵀm with C = ½L⁻ᵀSL⁻¹, so that the whitened ∂L/∂Σ of the step is S."""
    batch, d = s.shape[:-2], s.shape[-1]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch + (d, d), generator=g, dtype=F64)
    tril = torch.linalg.cholesky(a @ a.mT / d + 0.5 * torch.eye(d, dtype=F64))
    loc = loc_scale * torch.randn(batch + (d,), generator=g, dtype=F64)
    d_loc = torch.randn(batch + (d,), generator=g, dtype=F64)
    inv = torch.linalg.solve_triangular(tril, torch.eye(d, dtype=F64).expand_as(tril),
                                        upper=False)
    c = 0.5 * inv.mT @ s @ inv
    param = Direct(KEY, (constraints.real, constraints.lower_cholesky))
    leaves = {n: v.to(dtype).requires_grad_() for n, v in param.unconstrained((loc, tril)).items()}
    m, lower = param.args(leaves)
    loss = (c.to(dtype) * (lower @ lower.mT)).sum() + (d_loc.to(dtype) * m).sum()
    grads = dict(zip(KEY, torch.autograd.grad(loss, [leaves[n] for n in KEY]), strict=True))
    return param, {n: v.detach() for n, v in leaves.items()}, grads, d_loc.to(dtype)


def _candidate(family, param, leaves, grads, rate, mirror=None, momentum=None,
               multiplicity=1.0):
    args = param.args(leaves)
    base = family.distribution(*args)
    site = Site("z", base, base, family, multiplicity, 1.0, KEY, param)
    mirror = mirror or Mirror()
    return mirror.propose(KEY, site, leaves, grads, momentum).candidate(rate)


def _momentum(leaves, d_loc, param) -> HeavyBall:
    """A heavy ball whose previous step moved the mean by −0.1·∂L/∂m (downhill), from a mean
    where the gradient was 3∂L/∂m: a velocity, with the secant model's reach 0.5."""
    momentum = HeavyBall(0.5)
    loc = param.args(leaves)[0]
    momentum.last[KEY] = (loc + 0.1 * d_loc, 3 * d_loc, 0.5)
    return momentum


def _assert_same(factor, generic, rtol=1e-9):
    assert factor is not None and generic is not None
    for n in KEY:
        torch.testing.assert_close(factor.values[n], generic.values[n], rtol=rtol, atol=rtol)
    assert factor.kl == pytest.approx(generic.kl, rel=rtol)
    assert (factor.note, factor.repaired, factor.anchor is None) == (
        generic.note, generic.repaired, generic.anchor is None)


# at rate 0.9: element 0 stays in the domain, element 1 needs 2 halvings of its precision rate
# (0.9·¼·3 < 1), element 2 needs 6 (0.9·2⁻⁶·50 < 1); at rate 0.3 element 2 needs 4
LEAVING = [-0.5, -3.0, -50.0]


@pytest.mark.parametrize("domain", [PrecisionShortening, Retraction])
@pytest.mark.parametrize("lowest", [[-0.5, 0.2, -0.9], LEAVING], ids=["clean", "leaving"])
@pytest.mark.parametrize("with_momentum", [False, True], ids=["", "momentum"])
@pytest.mark.parametrize("multiplicity", [1.0, 4.0])
def test_factor_step_equals_the_natural_parameter_step(domain, lowest, with_momentum,
                                                       multiplicity):
    param, leaves, grads, d_loc = _problem(_spectrum(lowest, 12))
    notes = []
    for rate in (0.9, 0.3):
        momentum = _momentum(leaves, d_loc, param) if with_momentum else None
        # the floor lifts Ritz directions only on the factor path: compared without it
        repair = domain(floor=0.0) if domain is PrecisionShortening else domain()
        factor, generic = (_candidate(family, param, leaves, grads, rate, Mirror(repair),
                                      momentum, multiplicity)
                           for family in (MultivariateNormal(), _NaturalParameters()))
        _assert_same(factor, generic)
        notes.append(factor.note)
    if lowest is not LEAVING:
        assert notes == ["", ""]
    elif multiplicity == 1.0 and domain is PrecisionShortening:
        # rate 0.9: 2⁻⁶ at element 2, and element 1 shortened too; rate 0.3: 2⁻⁴ at element 2
        assert notes == ["precision step shortened to 0.0156 of the mean's at 2 of 3 elements",
                         "precision step shortened to 0.0625 of the mean's at 1 of 3 elements"]
    elif multiplicity == 1.0:
        assert notes == ["retraction at 2 of 3 elements", "retraction at 1 of 3 elements"]


def test_without_a_repair_a_step_that_leaves_the_domain_is_refused():
    """Mirror(domain=None): no candidate where the plain step leaves the domain (the optimizer
    then halves the whole rate), the plain step where it stays in it."""
    param, leaves, grads, _ = _problem(_spectrum(LEAVING, 12))
    bare = Mirror(domain=None)
    for family in (MultivariateNormal(), _NaturalParameters()):
        assert _candidate(family, param, leaves, grads, 0.9, bare) is None
    factor, generic = (_candidate(family, param, leaves, grads, 0.01, bare)
                       for family in (MultivariateNormal(), _NaturalParameters()))
    _assert_same(factor, generic)
    assert not factor.repaired


def test_precision_shortening_gives_up_after_max_halvings():
    """An element that needs 6 halvings with max_halvings = 3: no candidate on either path, and
    the factor path knows it from the Lanczos bound after at most one factorization."""
    param, leaves, grads, _ = _problem(_spectrum(LEAVING, 12))
    mirror = Mirror(PrecisionShortening(max_halvings=3))
    assert _candidate(_NaturalParameters(), param, leaves, grads, 0.9, mirror) is None
    args = param.args(leaves)
    base = MultivariateNormal().distribution(*args)
    site = Site("z", base, base, MultivariateNormal(), 1.0, 1.0, KEY, param)
    proposal = mirror.propose(KEY, site, leaves, grads, None)
    with count_ops(12) as ops:
        assert proposal.candidate(0.9) is None
    assert ops.factorizations <= 1, ops.calls


def test_precision_shortening_names_bad_options():
    with pytest.raises(ValueError, match="max_halvings must be an integer >= 0, got -1"):
        PrecisionShortening(max_halvings=-1)
    with pytest.raises(ValueError, match="lanczos_iters must be an integer >= 1, got 2.5"):
        PrecisionShortening(lanczos_iters=2.5)
    with pytest.raises(ValueError, match="margin must be an integer >= 0, got -1"):
        PrecisionShortening(margin=-1)
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\), got 1.5"):
        PrecisionShortening(floor=1.5)
    with pytest.raises(ValueError, match=r"hold must be in \[0, 1\), got -0.1"):
        PrecisionShortening(hold=-0.1)
    with pytest.raises(ValueError, match="verify must be an integer >= 0, got True"):
        PrecisionShortening(verify=True)


@pytest.mark.parametrize("spread", [False, True], ids=["diagonal-bound", "lanczos-bound"])
def test_halvings_excluded_by_the_bound_take_no_factorization(spread):
    """S = −10 vvᵀ (λ_min = −10): at rate 0.9 the precision rate must be halved 4 times
    (0.9·2⁻⁴·10 < 1). With v = e₀ the diagonal S₀₀ = −10 proves the first levels indefinite;
    with v spread over 40 coordinates (|Sᵢᵢ| < 1/0.9) the Ritz value of the Lanczos steps run
    before the first factorization does: one Cholesky either way, at the level found (halving
    by factorizations would take five; without the Lanczos bound the plain step's would fail
    first). The candidate's values then take one triangular solve."""
    d = 40
    v = torch.zeros(d, dtype=F64)
    v[0] = 1.0
    if spread:
        v = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=F64).sign()
        v = v / v.norm()  # Sᵢᵢ = −¼
    s = (-10 * torch.outer(v, v)).unsqueeze(0)
    param, leaves, grads, _ = _problem(s)
    family = MultivariateNormal()
    args = param.args(leaves)
    base = family.distribution(*args)
    site = Site("z", base, base, family, 1.0, 1.0, KEY, param)
    mirror = Mirror(PrecisionShortening(floor=0.0))
    proposal = mirror.propose(KEY, site, leaves, grads, None)
    with count_ops(d) as ops:
        factor = proposal.candidate(0.9)
    assert ops.factorizations == 1 and ops.cubic == 1, ops.calls
    with count_ops(d) as ops:
        dict(factor.values)
    assert ops.by_name() == {"linalg_solve_triangular": 1}, ops.calls
    assert "shortened to 0.0625" in factor.note
    _assert_same(factor, _candidate(_NaturalParameters(), param, leaves, grads, 0.9, mirror))


def _whitened_precision(param, leaves, candidate) -> torch.Tensor:
    """Per batch element, the eigenvalues of Λ'Λ⁻¹ (Λ' = the candidate's precision), ascending:
    1 / the factors by which the step widens q along its eigen-directions."""
    tril = param.args(leaves)[1]
    new_tril = param.args(candidate.values)[1]
    whitened = torch.linalg.solve_triangular(new_tril, tril, upper=False)  # L'⁻¹L
    return torch.linalg.eigvalsh(whitened.mT @ whitened)


@pytest.mark.parametrize("floor", [0.3, 0.6, 0.9])
def test_the_floor_lifts_only_the_directions_a_shortened_step_widens_too_far(floor):
    """Element 2 of LEAVING (S's spectrum −50 … 1) needs 6 halvings at rate 0.9; its first
    positive-definite point leaves Λ'Λ⁻¹ with eigenvalues 1 + 0.9·2⁻⁶·λᵢ, the smallest 0.30 (q
    widens 3.4× along S's bottom eigenvector). With the floor the eigenvalues are
    max(1 + 0.9·2⁻⁶·λᵢ, floor) once the Ritz pairs are exact (12 Lanczos steps in d = 12): the
    ones below it are lifted to it, every other direction keeps the shortened step, and element
    0, which stays in the domain, steps at the full rate. No factorization is added. With the
    default 10 Lanczos steps (interior Ritz pairs of this evenly spread spectrum not converged)
    the lift is still positive semidefinite: no eigenvalue falls, the smallest rises."""
    param, leaves, grads, _ = _problem(_spectrum(LEAVING, 12))
    args = param.args(leaves)
    base = MultivariateNormal().distribution(*args)
    site = Site("z", base, base, MultivariateNormal(), 1.0, 1.0, KEY, param)
    candidates, counts = {}, {}
    for value, iters in ((0.0, 12), (floor, 12), (0.0, 10), (floor, 10)):
        repair = PrecisionShortening(floor=value, lanczos_iters=iters)
        proposal = Mirror(repair).propose(KEY, site, leaves, grads, None)
        with count_ops(12) as ops:
            candidates[value, iters] = proposal.candidate(0.9)
        counts[value, iters] = ops.factorizations
    assert counts[floor, 12] == counts[0.0, 12] and counts[floor, 10] == counts[0.0, 10]
    plain, lifted, partly = (_whitened_precision(param, leaves, candidates[key])
                             for key in ((0.0, 12), (floor, 12), (floor, 10)))
    expected = 1 + 0.9 * 2.0**-6 * torch.linspace(-50.0, 1.0, 12, dtype=F64)
    torch.testing.assert_close(plain[2], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lifted[2], expected.clamp_min(floor), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(lifted[0], plain[0], rtol=1e-12, atol=1e-12)
    assert bool((partly[2] >= plain[2] - 1e-12).all()) and partly[2, 0] > plain[2, 0]
    assert candidates[floor, 12].note == candidates[0.0, 12].note


def test_a_noisy_group_holds_its_unshortened_steps_to_the_hold_floor():
    """S's spectrum −1.05 … 1 in d = 12: the step at rate 0.9 stays in the domain, Λ'Λ⁻¹'s
    smallest eigenvalue 1 − 0.9·1.05 = 0.055 (q widens 18× along it). A group not marked noisy
    takes it unchanged (a conjugate model's exact step is kept). A shortened step marks its
    group; a marked group's same step is lifted to ``hold`` (12 Lanczos steps in d = 12: exact
    Ritz pairs), every eigenvalue max(1 + 0.9λᵢ, hold), repaired and noted; ``hold=0`` leaves
    it out. The mark is the piece's state: it round-trips and is forgotten."""
    param, leaves, grads, _ = _problem(_spectrum([-1.05], 12))
    args = param.args(leaves)
    base = MultivariateNormal().distribution(*args)
    site = Site("z", base, base, MultivariateNormal(), 1.0, 1.0, KEY, param)

    def step(repair: PrecisionShortening):
        return Mirror(repair).propose(KEY, site, leaves, grads, None).candidate(0.9)

    expected = 1 + 0.9 * torch.linspace(-1.05, 1.0, 12, dtype=F64)
    fresh = PrecisionShortening(lanczos_iters=12)
    plain = step(fresh)
    torch.testing.assert_close(_whitened_precision(param, leaves, plain)[0], expected,
                               rtol=1e-9, atol=1e-9)
    assert plain.note == "" and not plain.repaired and KEY not in fresh.noisy
    leaving, leaving_leaves, leaving_grads, _ = _problem(_spectrum(LEAVING, 12))
    _candidate(MultivariateNormal(), leaving, leaving_leaves, leaving_grads, 0.9, Mirror(fresh))
    assert fresh.noisy == {KEY}  # marked by a shortened step
    held = step(fresh)
    torch.testing.assert_close(_whitened_precision(param, leaves, held)[0],
                               expected.clamp_min(0.2), rtol=1e-8, atol=1e-8)
    assert "precision held to 0.2" in held.note and held.repaired
    off = PrecisionShortening(lanczos_iters=12, hold=0.0)
    off.load_state_dict(fresh.state_dict())
    assert off.noisy == {KEY}
    torch.testing.assert_close(_whitened_precision(param, leaves, step(off))[0], expected,
                               rtol=1e-9, atol=1e-9)
    fresh.forget(KEY)
    assert fresh.state_dict() == {"noisy": []} and step(fresh).note == ""


def test_the_floor_check_lifts_a_direction_the_ritz_vectors_missed():
    """S with one eigenvalue at −60 and the rest in [−5, 1] (d = 12): the step at rate 0.9 is
    shortened to ρ_Λ = 0.9·2⁻⁶, where Λ'Λ⁻¹ = B has 1 − 60ρ_Λ = 0.16 along that direction (q
    widens 6× there) and ≥ 0.93 elsewhere. With one Lanczos step the Ritz vector misses it and
    the floor's lift cannot reach it (verify=0: 0.16 stays); the check's inverse iteration finds
    it and lifts it to the floor (0.6, to 5e-3), the other eigenvalues as they were. With exact
    Ritz pairs (12 Lanczos steps) the lift already covers it and the check changes nothing."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))
    spectrum = torch.cat([torch.tensor([-60.0]), torch.linspace(-5.0, 1.0, 11)]).to(F64)
    param, leaves, grads, _ = _problem((q @ torch.diag(spectrum) @ q.T)[None])

    def lowest(**options):
        mirror = Mirror(PrecisionShortening(**options))
        candidate = _candidate(MultivariateNormal(), param, leaves, grads, 0.9, mirror)
        assert "shortened to 0.0156" in candidate.note
        return _whitened_precision(param, leaves, candidate)[0]

    expected = 1 + 0.9 * 2.0**-6 * spectrum.sort().values
    missed = lowest(lanczos_iters=1, verify=0)
    assert float(missed[0]) == pytest.approx(float(expected[0]), rel=1e-6)  # 0.156
    checked = lowest(lanczos_iters=1)
    assert float(checked[0]) == pytest.approx(0.6, abs=5e-3)
    torch.testing.assert_close(checked[1:], missed[1:], rtol=1e-3, atol=1e-3)
    exact = lowest(lanczos_iters=12)
    torch.testing.assert_close(exact, lowest(lanczos_iters=12, verify=0), rtol=0, atol=0)
    assert float(exact[0]) == pytest.approx(0.6, rel=1e-6)


@pytest.mark.parametrize("margin", [0, 1, 2, 3])
def test_the_margin_bounds_how_far_a_shortened_natural_parameter_step_widens_q(margin):
    """The natural-parameter path (scalar families; here a full covariance stepped in η): after
    a shortening, ``margin`` more halvings, Λ' ⪰ (1 − 2⁻ᵐ)Λ. Element 2's first positive-definite
    point leaves λ_min(Λ'Λ⁻¹) = 1 − 0.9·2⁻⁶·50 ≈ 0.30; the margin lifts it to 1 − 2⁻ᵐ·0.70."""
    param, leaves, grads, _ = _problem(_spectrum(LEAVING, 12))
    mirror = Mirror(PrecisionShortening(margin=margin))
    candidate = _candidate(_NaturalParameters(), param, leaves, grads, 0.9, mirror)
    lowest = _whitened_precision(param, leaves, candidate)[..., 0]
    assert float(lowest[2]) == pytest.approx(1 - 0.5**margin * 0.9 * 2.0**-6 * 50, rel=1e-9)
    assert float(lowest[2]) >= 1 - 0.5**margin


@pytest.mark.parametrize("d", [10, 60])
@pytest.mark.parametrize("with_momentum", [False, True], ids=["", "momentum"])
def test_float32_kl_equals_torch_float64_kl(d, with_momentum):
    """The candidate's KL(q ‖ q'), computed from the factor in float32, against torch's closed
    form in float64 of the same step taken in float64, from rate 0.5 down to 1e-5 (KL ~ 1e-9):
    within 1e-3 relative (the ρ tr S − log|B| form was off by 500× at rate 1e-5)."""
    s = 0.3 * _spectrum([-0.5], d, seed=d)
    for rate in (0.5, 1e-2, 1e-5):
        kls = {}
        for dtype in (torch.float32, F64):
            param, leaves, grads, d_loc = _problem(s, dtype=dtype)
            momentum = _momentum(leaves, d_loc, param) if with_momentum else None
            candidate = _candidate(MultivariateNormal(), param, leaves, grads, rate,
                                   momentum=momentum)
            m, lower = (a.double() for a in param.args(leaves))
            new_m, new_lower = (a.double() for a in param.args(candidate.values))
            q = dist.MultivariateNormal(m, scale_tril=lower)
            new = dist.MultivariateNormal(new_m, scale_tril=new_lower)
            kls[dtype] = candidate.kl, float(kl_divergence(q, new).sum())
        (kl32, _), (kl64, torch64) = kls[torch.float32], kls[F64]
        assert kl64 == pytest.approx(torch64, rel=1e-8)
        assert kl32 == pytest.approx(torch64, rel=1e-3), rate


def _gaussian_target(d: int, indefinite: bool):
    """An AutoMultivariateNormal of d dims and the closed-form loss E_q[½(z − a)ᵀA(z − a)] − H[q]
    (exact gradients). A positive definite: the natural step at ρ = 1 lands on N(a, A⁻¹). A with
    one eigenvalue −20 (along a spread direction): the step must shorten its precision."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(d, d, generator=g, dtype=F64)
    a_mat = x @ x.T / d + torch.eye(d, dtype=F64)
    if indefinite:
        v = torch.randn(d, generator=g, dtype=F64)
        v = v / v.norm()
        a_mat = a_mat - (20 + float(v @ a_mat @ v)) * torch.outer(v, v)
    a = torch.randn(d, generator=g, dtype=F64)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(d, dtype=F64), 1.0).to_event(1))

    def loss(model_, guide_):  # the guide's params read from the store, so SVI sees them
        loc, scale, unit = (pyro.param(f"AutoMultivariateNormal.{n}")
                            for n in ("loc", "scale", "scale_tril"))
        q = dist.MultivariateNormal(loc, scale_tril=scale[:, None] * unit)
        diff = q.loc - a
        return (0.5 * (a_mat * q.covariance_matrix).sum() + 0.5 * diff @ a_mat @ diff
                - q.entropy())

    guide = AutoMultivariateNormal(model)
    guide()
    return model, guide, loss, a_mat, a


class _Counted:
    """The optimizer with its O(d³) calls counted per call (SVI checks the optimizer's class,
    so this replaces ``svi.optim`` after SVI is built)."""

    def __init__(self, optim, d):
        self.optim, self.d, self.counts, self.notes = optim, d, [], []

    def __call__(self, *args, **kwargs):
        with count_ops(self.d) as ops:
            self.optim(*args, **kwargs)
        (step,) = self.optim.last_step.values()
        self.notes.append(step.get("note", ""))
        candidates = step["backtracks"] + 1 if step["method"] == "natural" else 0
        self.counts.append((ops.cubic, ops.factorizations, candidates))


def _counted_svi(model, guide, optim, loss, d):
    svi = SVI(model, guide, optim, loss)
    svi.optim = _Counted(optim, d)
    return svi


def test_a_clean_full_covariance_step_takes_one_factorization():
    """d = 30, exact gradients, lr = 1: one NaturalGradient step lands on the posterior with
    three O(d³) calls: the product forming S, one Cholesky and one triangular solve (the
    η-path took 10, 4 of them factorizations)."""
    d = 30
    model, guide, loss, a_mat, a = _gaussian_target(d, indefinite=False)
    svi = _counted_svi(model, guide, NaturalGradient(guide, lr=1.0), loss, d)
    svi.step()
    assert svi.optim.counts == [(3, 1, 1)], svi.optim.counts
    q = guide.get_posterior()
    torch.testing.assert_close(q.loc.detach(), a, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(q.covariance_matrix.detach(), torch.linalg.inv(a_mat),
                               rtol=1e-8, atol=1e-8)


def test_a_repaired_full_covariance_step_takes_one_factorization_per_candidate():
    """d = 30, A with an eigenvalue −20: the precision rate is halved once. Per optimizer step
    the O(d³) calls are the product forming S, the factorizations, at most one per tried
    candidate, one more for the plain step the diagonal bound could not exclude (halving by
    factorizations took one per halving: 5 here), and one triangular solve for the accepted
    candidate's factor."""
    d = 30
    model, guide, loss, _, _ = _gaussian_target(d, indefinite=True)
    svi = _counted_svi(model, guide, NaturalGradient(guide, lr=1.0), loss, d)
    for _ in range(3):
        svi.step()
    # S = LᵀAL − I = 0.01A − I at Pyro's initial L = 0.1·I: λ_min(S) = −1.2006, so
    # I + ρ_Λ S is positive definite first at ρ_Λ = ½ (as the η-path finds)
    assert svi.optim.notes[0] == ("precision step shortened to 0.5 of the mean's at 1 of 1 "
                                  "elements"), svi.optim.notes
    for cubic, factorizations, candidates in svi.optim.counts:
        assert cubic == 2 + factorizations, svi.optim.counts
        assert factorizations <= candidates + 1, svi.optim.counts


def test_monte_carlo_full_covariance_steps_count():
    """Logistic regression, d = 30, 8 particles (every step shortens its precision): per
    optimizer step one product, the factorizations, at most one per tried candidate plus one
    (the plain step the diagonal bound did not exclude), and one triangular solve for the
    accepted candidate (rejected ones are judged by their KL, from the factorization alone).
    The η-path took 10–18 O(d³) calls, 4–10 of them factorizations."""
    d = 30
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, d, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, d, dtype=F64)), generator=g)
    guide = AutoMultivariateNormal(logistic_model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    with torch.no_grad():
        elbo.loss(logistic_model, guide, X, y)
    svi = _counted_svi(logistic_model, guide, NaturalGradient(guide), elbo, d)
    for _ in range(6):
        svi.step(X, y)
    stepped = [(c, f, n) for c, f, n in svi.optim.counts if n]
    assert len(stepped) >= 4, svi.optim.counts
    for cubic, factorizations, candidates in stepped:
        assert cubic == 2 + factorizations and factorizations <= candidates + 1, stepped


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-13), (torch.float32, 5e-6)])
def test_lanczos_ritz_value_never_lies_below_the_smallest_eigenvalue(dtype, tol):
    """The halvings skipped by PrecisionShortening rest on θ ≥ λ_min(S). S = 0.01A − I (a
    clustered spectrum, as at Pyro's initial scale), a random symmetric S, and −I plus a rank-8
    term, with as many Lanczos steps as dimensions: with one Gram–Schmidt pass per step the
    basis lost orthogonality after convergence and θ fell to −15.9 for λ_min = −1.2."""
    g = torch.Generator().manual_seed(5)
    d = 30
    x = torch.randn(d, d, generator=g, dtype=F64)
    u, e = (torch.randn(d, 4, generator=g, dtype=F64) for _ in range(2))
    eye = torch.eye(d, dtype=F64)
    for s in (0.01 * (x @ x.T / d + eye) - eye, x + x.T, -eye + u @ e.T + e @ u.T):
        lowest, top = torch.linalg.eigvalsh(s)[[0, -1]].tolist()
        for iters in (10, 20, d):
            ritz, _ = smallest_eigenvalue(s.to(dtype), iters)
            assert float(ritz) >= lowest - tol * max(abs(lowest), abs(top)), iters
