"""compose_gaussian against the analytic step-level optimum on Gaussian kernels (docs/design.md §2)."""

import math

import pytest
import torch

from composition.msdda import compose_gaussian

DTYPE = torch.float64


def tilted_gaussian(ref_mean, ref_var, linear, quadratic, beta):
    """N(ref_mean, ref_var) * exp(r(a) / beta) with r(a) = linear * a - quadratic * a^2 / 2, normalised."""
    precision = 1 / ref_var + quadratic / beta
    mean = (ref_mean / ref_var + linear / beta) / precision
    return mean, 1 / precision


def make_problem(k, shape, seed):
    g = torch.Generator().manual_seed(seed)
    ref_mean = torch.randn(shape, generator=g, dtype=DTYPE)
    ref_var = 0.2 + torch.rand(shape, generator=g, dtype=DTYPE)
    linear = torch.randn((k, *shape), generator=g, dtype=DTYPE)
    quadratic = torch.rand((k, *shape), generator=g, dtype=DTYPE)  # >= 0: each tilt is a valid Gaussian
    return ref_mean, ref_var, linear, quadratic


CASES = [
    # (weights, betas, beta)
    ([0.3, 0.7], None, None),
    ([0.5, 0.5], [0.1, 0.1], None),
    ([1.4, -0.2], [0.2, 0.2], 0.2),  # outside the simplex, sum = 1.2
    ([0.2, 0.1], [0.5, 0.05], 0.3),  # differing betas, sum lam != 1
    ([0.2, 0.3, 0.5], [0.1, 0.2, 0.4], 0.25),
    ([0.6, 0.6, 0.6], None, None),  # sum 1.8 > 1
    ([0.1, -0.1, 0.7, 0.4], [0.3, 0.1, 0.2, 0.5], 0.2),
    ([0.25, 0.25, 0.25, 0.25], None, None),
]


@pytest.mark.parametrize(("weights", "betas", "beta"), CASES)
def test_composition_equals_the_combined_step_level_optimum(weights, betas, beta):
    k, shape = len(weights), (3, 5)
    ref_mean, ref_var, linear, quadratic = make_problem(k, shape, seed=k + len(str(weights)))
    betas_t = torch.tensor(betas if betas else [1.0] * k, dtype=DTYPE)
    target_beta = beta if beta is not None else float(betas_t[0])

    # Each base model is its own exact optimum pi_i* for r_i with beta_i.
    base = [tilted_gaussian(ref_mean, ref_var, linear[i], quadratic[i], betas_t[i]) for i in range(k)]
    means = torch.stack([m for m, _ in base])
    variances = torch.stack([v for _, v in base])

    # The target: p_ref * exp(sum_i w_i r_i / beta), with r = linear * a - quadratic * a^2 / 2.
    w = torch.tensor(weights, dtype=DTYPE).view(k, 1, 1)
    expected_mean, expected_var = tilted_gaussian(
        ref_mean, ref_var, (w * linear).sum(0), (w * quadratic).sum(0), target_beta
    )
    assert (expected_var > 0).all()

    mean, var = compose_gaussian(means, variances, weights, ref_mean, ref_var, betas=betas, beta=beta)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-10, atol=1e-12)


def test_float32_is_exact_to_float_precision():
    ref_mean, ref_var, linear, quadratic = make_problem(3, (64,), seed=1)
    base = [tilted_gaussian(ref_mean, ref_var, linear[i], quadratic[i], 0.5) for i in range(3)]
    weights = [0.2, 0.5, 0.6]
    w = torch.tensor(weights, dtype=DTYPE).view(3, 1)
    expected, expected_var = tilted_gaussian(
        ref_mean, ref_var, (w * linear).sum(0), (w * quadratic).sum(0), 0.5
    )
    mean, var = compose_gaussian(
        torch.stack([m for m, _ in base]).float(),
        torch.stack([v for _, v in base]).float(),
        weights,
        ref_mean.float(),
        ref_var.float(),
    )
    torch.testing.assert_close(mean.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-6)


def test_sum_one_needs_no_reference_and_equal_variances_blend_means():
    means = torch.randn(3, 4, 8, 8, dtype=DTYPE)
    weights = [0.2, 0.3, 0.5]
    mean, var = compose_gaussian(means, 0.04, weights)
    blend = sum(w * m for w, m in zip(weights, means))
    torch.testing.assert_close(mean, blend)
    torch.testing.assert_close(var, torch.full_like(mean, 0.04))


def test_different_variances_weight_by_precision():
    means = torch.tensor([[0.0], [1.0]], dtype=DTYPE)
    variances = torch.tensor([[1.0], [0.25]], dtype=DTYPE)
    mean, var = compose_gaussian(means, variances, [0.5, 0.5])
    # precisions 0.5 and 2: mean = (0 * 0.5 + 1 * 2) / 2.5
    assert math.isclose(float(mean), 0.8) and math.isclose(float(var), 1 / 2.5)


def test_reference_only_when_weights_are_zero():
    ref_mean, ref_var = torch.randn(5, dtype=DTYPE), torch.rand(5, dtype=DTYPE) + 0.1
    mean, var = compose_gaussian(torch.randn(2, 5, dtype=DTYPE), 0.3, [0.0, 0.0], ref_mean, ref_var)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [0.5, 0.3, 0.2]}, "weights has 3 entries but there are 2"),
        ({"weights": [float("nan"), 1.0]}, "weights must be finite"),
        ({"weights": [float("inf"), 0.0]}, "weights must be finite"),
        ({"weights": [0.3, 0.3]}, "reference kernel"),
        (
            {"weights": [0.5, 0.5], "means": torch.tensor([[0.0], [float("nan")]])},
            "means contains non-finite",
        ),
        (
            {"weights": [0.3, 0.3], "ref_mean": torch.tensor([0.0]), "ref_var": torch.tensor([float("inf")])},
            "ref_var contains non-finite",
        ),
        ({"weights": [0.5, 0.5], "betas": [0.1, 0.2]}, r"set the target beta \(composition.beta\)"),
        ({"weights": [0.5, 0.5], "betas": [0.1]}, "betas has 1 entries"),
        ({"weights": [0.5, 0.5], "betas": [0.1, -0.1], "beta": 0.1}, "betas must be finite and positive"),
        (
            {
                "weights": [2.0, 0.0],
                "variances": torch.tensor([[3.0], [1.0]]),
                "ref_mean": torch.tensor([0.0]),
                "ref_var": torch.tensor([1.0]),
            },
            "precision is not positive",
        ),
        ({"weights": [1.0, 0.0], "variances": torch.tensor([[0.0], [1.0]])}, "variances must be positive"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, message):
    args = {"means": torch.zeros(2, 1), "variances": torch.ones(2, 1)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compose_gaussian(**args)
