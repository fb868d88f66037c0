"""The composition engine and evaluation: grids, Pareto fronts, hypervolume, rewarded soup, every method on
the tiny model, lineage checks and bad input."""

import json
import math

import pytest
import torch

from composition.evaluation import dominates, hypervolume, hypervolume_se, pareto_front, simplex_grid
from composition.soup import merge_lora_states
from training.card import CARD_FILE

# ------------------------------------------------------------------------------------------- pure evaluation


def test_simplex_grids():
    two = simplex_grid(2, 11)
    assert len(two) == 11 and two[0] == [0.0, 1.0] and two[-1] == [1.0, 0.0]
    assert all(math.isclose(sum(w), 1.0) for w in two)
    three = simplex_grid(3, 5)
    assert len(three) == 15 and all(min(w) >= 0 and math.isclose(sum(w), 1.0) for w in three)
    assert len({tuple(w) for w in three}) == 15


def test_pareto_front_and_dominance():
    points = [(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0)]
    assert dominates((0.5, 0.5), (0.4, 0.4)) and not dominates((1, 0), (0, 1))
    assert pareto_front(points) == [0, 1, 2, 4]


def test_hypervolume_matches_hand_computed_areas():
    assert hypervolume([(1, 1)], (0, 0)) == pytest.approx(1.0)
    # Union of [0,2]x[0,1] and [0,1]x[0,2]: 3.
    assert hypervolume([(2, 1), (1, 2)], (0, 0)) == pytest.approx(3.0)
    # A dominated point adds nothing; a point below the reference adds nothing.
    assert hypervolume([(2, 1), (1, 2), (0.5, 0.5), (-1, 5)], (0, 0)) == pytest.approx(3.0)
    assert hypervolume([(1, 1, 1), (2, 0.5, 0.5)], (0, 0, 0)) == pytest.approx(1 + 0.25)
    assert hypervolume([], (0, 0)) == 0.0


def test_hypervolume_agrees_with_monte_carlo_in_three_dimensions():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(12, 3, generator=g).tolist()
    exact = hypervolume(points, (0, 0, 0))
    samples = torch.rand(200_000, 3, generator=g)
    covered = torch.zeros(len(samples), dtype=torch.bool)
    for p in points:
        covered |= (samples <= torch.tensor(p)).all(1)
    assert exact == pytest.approx(covered.float().mean().item(), abs=0.01)


def test_hypervolume_bootstrap_se_reflects_the_spread_over_images():
    g = torch.Generator().manual_seed(0)
    constant = [torch.tensor([[1.0, 2.0]]).expand(50, 2), torch.tensor([[2.0, 1.0]]).expand(50, 2)]
    assert hypervolume_se(constant, (0, 0), replicates=20) == 0.0
    noisy = [c + 0.3 * torch.randn(50, 2, generator=g) for c in constant]
    noisier = [c + 0.9 * torch.randn(50, 2, generator=g) for c in constant]
    se, se_noisier = hypervolume_se(noisy, (0, 0)), hypervolume_se(noisier, (0, 0))
    assert 0 < se < se_noisier


def test_rewarded_soup_merge_is_the_exact_weighted_sum_of_deltas():
    g = torch.Generator().manual_seed(0)
    states = [
        {"m.lora_A.weight": torch.randn(4, 6, generator=g), "m.lora_B.weight": torch.randn(5, 4, generator=g)}
        for _ in range(3)
    ]
    weights = [0.2, -0.5, 1.3]
    merged = merge_lora_states(states, weights)
    expected = sum(w * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for w, s in zip(weights, states))
    torch.testing.assert_close(merged["m.lora_B.weight"] @ merged["m.lora_A.weight"], expected)
    assert merged["m.lora_A.weight"].shape == (12, 6)


# ----------------------------------------------------------------------------- the engine on the tiny model


@pytest.fixture(scope="module")
def ensemble(tiny_config, tiny_home, tiny_base_models):
    from composition.engine import load_ensemble

    return load_ensemble(tiny_config, tiny_home, tiny_base_models)


@pytest.mark.parametrize("method", ["msdda", "db", "rs", "code", "rgg"])
def test_every_method_samples_seeded_images(ensemble, tiny_config, method):
    from composition.engine import generate

    options = tiny_config.composition.model_copy(update={"batch_size": 4, "code_block": 2})
    first = generate(ensemble, method, [0.3, 0.7], options, num_images=6, seed=1)
    again = generate(ensemble, method, [0.3, 0.7], options, num_images=6, seed=1)
    other = generate(ensemble, method, [0.3, 0.7], options, num_images=6, seed=2)
    assert first.images.shape == (6, 3, 16, 16) and torch.isfinite(first.images).all()
    torch.testing.assert_close(first.images, again.images)
    assert not torch.allclose(first.images, other.images)
    steps = tiny_config.sampling.num_inference_steps
    expected_nfe = {"msdda": 2, "db": 2, "rs": 1, "code": options.code_candidates, "rgg": 3}[method] * steps
    assert first.nfe_per_image == expected_nfe
    # reward evaluations while sampling: CoDe scores N candidates per block, RGG one gradient (2) per step
    blocks = -(-steps // options.code_block)
    expected_calls = {"code": options.code_candidates * blocks, "rgg": 2 * steps}.get(method, 0)
    assert first.reward_calls_per_image == expected_calls


def test_path_kl_and_the_regularised_objective(ensemble, tiny_config):
    from composition.engine import generate
    from composition.evaluation import sweep

    options = tiny_config.composition.model_copy(update={"batch_size": 4, "code_block": 2, "path_kl": True})
    steps = tiny_config.sampling.num_inference_steps
    reference = generate(ensemble, "msdda", [0.0, 0.0], options, num_images=4, seed=1)
    assert reference.path_kl.abs().max() < 1e-5  # w = 0 is the reference itself
    composed = generate(ensemble, "msdda", [0.5, 0.5], options, num_images=4, seed=1)
    assert (composed.path_kl > 0).all() and composed.nfe_per_image == 2 * steps  # the KL's rows are free
    guided = generate(ensemble, "rgg", [0.5, 0.5], options, num_images=4, seed=1)
    assert (guided.path_kl > 0).all() and guided.nfe_per_image == 3 * steps
    best_of = generate(ensemble, "code", [0.5, 0.5], options, num_images=4, seed=1)
    blocks = -(-steps // options.code_block)
    torch.testing.assert_close(best_of.path_kl, torch.full((4,), blocks * math.log(options.code_candidates)))
    result = sweep(ensemble, options.model_copy(update={"num_images": 4}), methods=["msdda"], grid=2)
    for point in result["methods"]["msdda"]["points"]:
        assert {"kl", "J", "J_se"} <= point.keys() and point["kl"] >= 0


@pytest.mark.parametrize("method", ["msdda", "db"])
def test_plans_and_routed_weights_give_the_same_images(ensemble, tiny_config, method):
    """One routed call or K calls, merged weights or LoRA deltas: how the K evaluations run, not what they
    compute (same images up to float rounding, same NFE), with the reference's slice in the routing."""
    from composition.engine import generate

    images, nfe = [], set()
    for plan in ("one_call", "per_model"):
        for routed in ("merged", "lora"):
            options = tiny_config.composition.model_copy(update={"plan": plan, "routed_weights": routed})
            generated = generate(ensemble, method, [0.2, 0.3], options, num_images=4, seed=3)
            images.append(generated.images)
            nfe.add(generated.nfe_per_image)
    for other in images[1:]:
        torch.testing.assert_close(other, images[0], rtol=1e-4, atol=1e-5)
    assert len(nfe) == 1 and nfe.pop() == 3 * tiny_config.sampling.num_inference_steps


def test_one_hot_weights_make_msdda_and_the_soup_the_same_sampler(ensemble, tiny_config):
    """With one-hot weights MSDDA (a product of one kernel) and RS (the soup ``1 * B_1 A_1``, variance offset
    ``1 * v_1``) are both the first base model's own kernel, learned variance included: from the same seed
    (every method draws the same noise) they give the same images."""
    from composition.engine import generate

    options = tiny_config.composition
    msdda = generate(ensemble, "msdda", [1.0, 0.0], options, num_images=4)
    soup = generate(ensemble, "rs", [1.0, 0.0], options, num_images=4)
    torch.testing.assert_close(msdda.images, soup.images, rtol=1e-4, atol=1e-4)


def test_sweep_returns_the_documented_shape(ensemble, tiny_config, tmp_path):
    from composition.evaluation import plot_fronts, sweep

    options = tiny_config.composition.model_copy(update={"num_images": 4, "code_block": 2})
    seen = []
    result = sweep(
        ensemble,
        options,
        methods=["msdda", "db"],
        grid=3,
        on_point=lambda method, weights, images: seen.append((method, tuple(weights))),
    )
    assert result["objectives"] == ["digit_alignment", "ink_economy"]
    assert set(result["methods"]) == {"msdda", "db"}
    assert seen[0] == ("reference", (0.0, 0.0)) and len(seen) == 1 + 2 * 3
    for method in result["methods"].values():
        assert method["hypervolume"] >= 0 and len(method["points"]) == 3
        point = method["points"][1]
        assert point["weights"] == [0.5, 0.5]
        assert set(point["rewards"]) == set(point["reward_se"]) == {"digit_alignment", "ink_economy"}
        assert point["nfe"] > 0 and point["seconds"] > 0
        assert method["hypervolume_se"] >= 0 and "kl" not in point  # path KL is off by default
    json.dumps(result)
    png = plot_fronts(result, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("0.3,abc", "not a comma-separated list"),
        ("nan,0.5", "finite"),
        ("0.2,0.3,0.5", "3 weights given for 2"),
    ],
)
def test_bad_weights_are_one_line_errors(weights, message):
    from composition.engine import CompositionError, parse_weights

    with pytest.raises(CompositionError, match=message):
        parse_weights(weights, 2)


def test_non_positive_precision_is_refused(ensemble, tiny_config):
    from composition.engine import CompositionError, generate

    with pytest.raises(CompositionError, match="precision is not positive"):
        generate(ensemble, "msdda", [-5.0, 5.0], tiny_config.composition, num_images=2)


def test_load_ensemble_refuses_models_of_another_lineage(tiny_config, tiny_home, tiny_base_models, tmp_path):
    """The card's lineage check guards the engine (the card's own tests cover every message)."""
    import shutil

    from composition.engine import load_ensemble
    from training.card import CardError

    other = tmp_path / "other"
    shutil.copytree(tiny_base_models[1], other)
    meta = json.loads((other / CARD_FILE).read_text())
    (other / CARD_FILE).write_text(json.dumps({**meta, "reference_hash": "f" * 64}))
    with pytest.raises(CardError, match="different reference models"):
        load_ensemble(tiny_config, tiny_home, [tiny_base_models[0], other])
    with pytest.raises(CardError, match="this config's reference is"):
        load_ensemble(tiny_config, tiny_home, [other])


def test_rgg_refuses_non_differentiable_rewards(ensemble, tiny_config):
    from composition.engine import CompositionError, generate
    from training.rewards import load_reward

    saved = dict(ensemble.rewards)
    try:
        ensemble.rewards["ink_economy"] = load_reward("compressibility", tiny_config, None)
        with pytest.raises(CompositionError, match="differentiable rewards; not differentiable: ink_economy"):
            generate(ensemble, "rgg", [0.5, 0.5], tiny_config.composition, num_images=2)
    finally:
        ensemble.rewards.clear()
        ensemble.rewards.update(saved)
