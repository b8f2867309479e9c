"""empirical_fisher against the seed's per-sample loop, a closed form and its own "full" kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pyro_natgrad.fisher.empirical import empirical_fisher

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def compute_empirical_fisher(model, inputs, targets, loss_fn):
    """
    Computes the diagonal of the Empirical Fisher Information Matrix.
    """
    fisher_diag = [torch.zeros_like(p) for p in model.parameters()]

    # Must compute gradient per sample!
    for i in range(len(inputs)):
        x = inputs[i:i+1]
        y = targets[i:i+1]

        model.zero_grad()
        output = model(x)
        loss = loss_fn(output, y)
        loss.backward()

        # Accumulate squared gradients
        for j, p in enumerate(model.parameters()):
            if p.grad is not None:
                fisher_diag[j] += p.grad.data ** 2

    # Average over batch
    fisher_diag = [f / len(inputs) for f in fisher_diag]
    return fisher_diag


def toy_problem(dtype: torch.dtype, n: int = 32):
    """The seed's toy network: nn.Linear(10, 2), 32 samples, CrossEntropyLoss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 2)).to(dtype)
    inputs = torch.randn(n, 10, dtype=dtype)
    targets = torch.randint(0, 2, (n,))
    return model, inputs, targets, nn.CrossEntropyLoss()


def mlp_problem(dtype: torch.dtype, n: int = 40):
    """A 2-layer MLP regression with a mean-squared-error loss."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    inputs = torch.randn(n, 6, dtype=dtype)
    targets = torch.randn(n, 3, dtype=dtype)
    return model, inputs, targets, nn.MSELoss()


PROBLEMS = pytest.mark.parametrize("problem", [toy_problem, mlp_problem], ids=["toy", "mlp"])


@DTYPES
@PROBLEMS
def test_diag_equals_seed_loop(problem, dtype):
    model, inputs, targets, loss_fn = problem(dtype)
    expected = compute_empirical_fisher(model, inputs, targets, loss_fn)
    got = empirical_fisher(model, inputs, targets, loss_fn)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, **TOL[dtype])


@DTYPES
@PROBLEMS
def test_full_diagonal_equals_diag(problem, dtype):
    model, inputs, targets, loss_fn = problem(dtype)
    full = empirical_fisher(model, inputs, targets, loss_fn, kind="full")
    diag = empirical_fisher(model, inputs, targets, loss_fn, kind="diag")
    p = sum(t.numel() for t in model.parameters())
    assert full.shape == (p, p)
    torch.testing.assert_close(full, full.T, **TOL[dtype])
    torch.testing.assert_close(full.diagonal(), torch.cat([d.reshape(-1) for d in diag]),
                               **TOL[dtype])


@DTYPES
def test_full_equals_closed_form_for_linear_regression(dtype):
    """y = wᵀx + b with squared error: g_n = 2 r_n (x_n, 1), r_n = wᵀx_n + b - y_n, so
    F̂ = (4/N) Σ_n r_n² (x_n, 1)(x_n, 1)ᵀ in the order (w, b) of model.parameters()."""
    torch.manual_seed(2)
    model = nn.Linear(4, 1).to(dtype)
    inputs = torch.randn(25, 4, dtype=dtype)
    targets = torch.randn(25, 1, dtype=dtype)
    with torch.no_grad():
        r = (model(inputs) - targets).squeeze(-1)
    features = torch.cat([inputs, torch.ones(25, 1, dtype=dtype)], dim=1)
    expected = 4 * (features * r[:, None].square()).T @ features / 25
    got = empirical_fisher(model, inputs, targets, nn.MSELoss(), kind="full")
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_chunks_give_the_same_result(kind):
    model, inputs, targets, loss_fn = mlp_problem(torch.float64)
    whole = empirical_fisher(model, inputs, targets, loss_fn, kind=kind)
    chunked = empirical_fisher(model, inputs, targets, loss_fn, kind=kind, chunk_size=7)
    torch.testing.assert_close(chunked, whole, **TOL[torch.float64])


def test_frozen_parameters_get_zeros_as_in_the_loop():
    model, inputs, targets, loss_fn = mlp_problem(torch.float64)
    model[0].weight.requires_grad_(False)
    expected = compute_empirical_fisher(model, inputs, targets, loss_fn)
    got = empirical_fisher(model, inputs, targets, loss_fn)
    assert not got[0].any()
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    full = empirical_fisher(model, inputs, targets, loss_fn, kind="full")
    frozen = model[0].weight.numel()
    assert not full[:frozen].any() and not full[:, :frozen].any()


def test_model_is_left_untouched():
    model, inputs, targets, loss_fn = toy_problem(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    empirical_fisher(model, inputs, targets, loss_fn, kind="full")
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.grad is None
        assert torch.equal(p.detach(), b)


def test_seed_demo_prints_layer_shape(capsys):
    model, inputs, targets, loss_fn = toy_problem(torch.float32)
    fisher = empirical_fisher(model, inputs, targets, loss_fn)
    print(f"Fisher Diagonal Shape for Layer 1 Weights: {fisher[0].shape}")
    out = capsys.readouterr().out
    assert out == "Fisher Diagonal Shape for Layer 1 Weights: torch.Size([2, 10])\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(inputs=torch.randn(0, 10), targets=torch.zeros(0, dtype=torch.long)), "empty batch"),
        (dict(targets=torch.zeros(31, dtype=torch.long)), "different numbers of samples"),
        (dict(kind="trace"), "unknown kind"),
        (dict(model=nn.ReLU()), "has no parameters"),
        (dict(model=nn.Linear(10, 2).requires_grad_(False)), "requires_grad=False"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(loss_fn=nn.CrossEntropyLoss(reduction="none")), "scalar"),
        (dict(inputs=torch.tensor(1.0)), "leading sample dimension"),
    ],
    ids=["empty", "lengths", "kind", "no-params", "all-frozen", "chunk", "reduction", "0-d"],
)
def test_bad_input_raises(change, message):
    model, inputs, targets, loss_fn = toy_problem(torch.float32)
    args = dict(model=model, inputs=inputs, targets=targets, loss_fn=loss_fn) | change
    with pytest.raises(ValueError, match=message):
        empirical_fisher(**args)
