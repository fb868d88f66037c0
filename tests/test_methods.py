"""Every composition method at the sampler level, on the tiny UNet with two random adapters, against its
formula written out by hand (docs/design.md §2-3), with the same x_T and noise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from composition.methods import METHODS, Batch, Composer
from configs.schema import CompositionConfig
from tests.helpers import REPO, unet_inputs
from training.analysis.toy import make_scheduler
from training.step.chain import run_chain
from training.step.kernel import DDIMSchedule, ddim_mean, ddim_x0

LOG_VARIANCE = {"alpha": torch.full((4, 1), -0.4), "beta": torch.full((4, 1), 0.3)}


def composer(unet, log_variance=LOG_VARIANCE, steps=4, **options) -> Composer:
    models = [
        SimpleNamespace(objective=name, beta=0.01, log_variance=log_variance.get(name), rank=4)
        for name in ("alpha", "beta")
    ]
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), steps, 1.0)
    return Composer(unet, schedule, 1.0, models, CompositionConfig(**options))


def inputs(unet, seed=0, batch=2):
    x_T, _, embeds = unet_inputs(unet, batch, seed)
    return x_T, Batch(embeds, None)


def sample(method, comp, weights, x_T, batch, seed=3, score=None):
    with torch.no_grad():
        return METHODS[method].sample(comp, weights, x_T, batch, torch.Generator().manual_seed(seed), score)


def by_hand(comp, x_T, batch, seed, step_fn):
    """A chain whose step is ``step_fn(x, step, eps: dict, sigma) -> (mean, std)``, noise drawn as the runner
    does."""
    g, x, s = torch.Generator().manual_seed(seed), x_T, comp.schedule
    with torch.no_grad():
        for step in range(len(s)):
            eps = dict(
                zip(["alpha", "beta", "ref"], comp.epsilons(x, step, batch, ["alpha", "beta", "__base__"]))
            )
            mean, std = step_fn(x, step, eps, s.sigma[step])
            x = mean + std * torch.randn(x.shape, generator=g)
    return x


def ddim(comp, x, step, eps):
    s = comp.schedule
    return ddim_mean(x, eps, s.alpha[step], s.alpha_prev[step], s.sigma[step])


@pytest.mark.parametrize(
    ("weights", "adapter"), [([1.0, 0.0], "alpha"), ([0.0, 1.0], "beta"), ([0.0, 0.0], "ref")]
)
def test_msdda_one_hot_and_zero_weights_reproduce_single_models(unet_with_two_adapters, weights, adapter):
    comp = composer(unet_with_two_adapters)
    x_T, batch = inputs(comp.unet)
    chain, nfe = sample("msdda", comp, weights, x_T, batch)
    offsets = {**LOG_VARIANCE, "ref": torch.zeros(4, 1)}
    expected = by_hand(
        comp,
        x_T,
        batch,
        3,
        lambda x, step, eps, sigma: (
            ddim(comp, x, step, eps[adapter]),
            sigma * offsets[adapter][step].exp().sqrt(),
        ),
    )
    torch.testing.assert_close(chain.latents, expected, rtol=1e-4, atol=1e-4)
    assert nfe == 4, "one UNet row per image and step"


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.9, 0.6], [1.3, -0.2]])
def test_msdda_with_unequal_variances_is_the_product_of_gaussians(unet_with_two_adapters, weights):
    """Off the simplex the reference kernel joins with weight 1 - sum w; variances differ by exp(0.7)."""
    comp = composer(unet_with_two_adapters)
    x_T, batch = inputs(comp.unet, seed=1)
    chain, nfe = sample("msdda", comp, weights, x_T, batch)
    w1, w2 = weights

    def product(x, step, eps, sigma):
        var = {
            "alpha": sigma**2 * LOG_VARIANCE["alpha"][step].exp(),
            "beta": sigma**2 * LOG_VARIANCE["beta"][step].exp(),
            "ref": sigma**2,
        }
        lam = {"alpha": w1, "beta": w2, "ref": 1 - w1 - w2}
        precision = sum(lam[k] / var[k] for k in lam)
        mean = sum(lam[k] / var[k] * ddim(comp, x, step, eps[k]) for k in lam) / precision
        return mean, precision.rsqrt()

    torch.testing.assert_close(chain.latents, by_hand(comp, x_T, batch, 3, product), rtol=1e-4, atol=1e-4)
    assert nfe == (2 if w1 + w2 == 1 else 3) * 4
    stds = [d["std_over_sigma"] for d in chain.diagnostics]
    assert all(abs(r - 1) > 0.01 for r in stds), "unequal variances change the composed variance"


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.9, 0.6]])
def test_epsilon_blend_is_its_formula(unet_with_two_adapters, weights):
    comp = composer(unet_with_two_adapters)
    x_T, batch = inputs(comp.unet, seed=2)
    chain, nfe = sample("db", comp, weights, x_T, batch)
    w1, w2 = weights
    expected = by_hand(
        comp,
        x_T,
        batch,
        3,
        lambda x, step, eps, sigma: (
            ddim(comp, x, step, w1 * eps["alpha"] + w2 * eps["beta"] + (1 - w1 - w2) * eps["ref"]),
            sigma,
        ),
    )
    torch.testing.assert_close(chain.latents, expected, rtol=1e-4, atol=1e-4)
    assert nfe == (2 if w1 + w2 == 1 else 3) * 4


def test_msdda_equals_the_blend_when_variances_are_equal(unet_with_two_adapters):
    comp = composer(unet_with_two_adapters, log_variance={})
    x_T, batch = inputs(comp.unet, seed=4)
    for weights in ([0.3, 0.7], [0.8, 0.5]):
        msdda, _ = sample("msdda", comp, weights, x_T, batch)
        blend, _ = sample("db", comp, weights, x_T, batch)
        torch.testing.assert_close(msdda.latents, blend.latents, rtol=1e-4, atol=1e-4)


def reference_chain(comp, x_T, batch, seed):
    def kernel(x, step):
        return comp.schedule.kernel(x, comp.epsilons(x, step, batch, ["__base__"])[0], step)

    with torch.no_grad():
        return run_chain(comp.schedule, x_T, kernel, torch.Generator().manual_seed(seed)).latents


def brightness(x0: torch.Tensor) -> torch.Tensor:
    return x0.flatten(1).mean(1)


def test_code_with_one_candidate_is_the_reference_chain(unet_with_two_adapters):
    comp = composer(unet_with_two_adapters, code_candidates=1, code_block=2)
    x_T, batch = inputs(comp.unet, seed=5)
    chain, nfe = sample("code", comp, [0.5, 0.5], x_T, batch, score=brightness)
    torch.testing.assert_close(chain.latents, reference_chain(comp, x_T, batch, 3))
    assert nfe == 4


def test_code_keeps_the_best_candidate(unet_with_two_adapters):
    """One block over the whole chain: CoDe returns, per image, the best of the N reference chains it drew."""
    n, b = 4, 3
    comp = composer(unet_with_two_adapters, code_candidates=n, code_block=4)
    x_T, batch = inputs(comp.unet, seed=6, batch=b)
    chain, nfe = sample("code", comp, [0.5, 0.5], x_T, batch, score=brightness)
    candidates = reference_chain(comp, x_T.repeat(n, 1, 1, 1), batch.repeat(n), 3).view(n, b, 4, 8, 8)
    scores = brightness(candidates.flatten(0, 1)).view(n, b)
    best = scores.argmax(0)
    torch.testing.assert_close(chain.latents, candidates[best, torch.arange(b)])
    assert (brightness(chain.latents) >= scores.max(0).values - 1e-6).all()
    assert len(set(best.tolist())) > 1 or scores.std() > 0, "the candidates really differ"
    assert nfe == n * 4


def test_code_blocks_select_on_the_clean_estimate(unet_with_two_adapters):
    """Two blocks of two steps: the first selection scores ``x0_hat`` of the block's last state."""
    n, b = 3, 2
    comp = composer(unet_with_two_adapters, code_candidates=n, code_block=2)
    x_T, batch = inputs(comp.unet, seed=7, batch=b)
    seen = []

    def score(x0):
        seen.append(x0.clone())
        return brightness(x0)

    chain, _ = sample("code", comp, [0.5, 0.5], x_T, batch, score=score)
    assert len(seen) == 2 and seen[0].shape == (n * b, 4, 8, 8)
    assert [d["block_start"] for d in chain.diagnostics] == [0, 2]
    # the first block's candidates, run by hand: x0_hat at t_prev of step 1, with step 1's epsilon
    g = torch.Generator().manual_seed(3)
    xs, cand = x_T.repeat(n, 1, 1, 1), batch.repeat(n)
    with torch.no_grad():
        for step in range(2):
            eps = comp.epsilons(xs, step, cand, ["__base__"])[0]
            xs = ddim(comp, xs, step, eps) + comp.schedule.sigma[step] * torch.randn(xs.shape, generator=g)
    torch.testing.assert_close(seen[0], ddim_x0(xs, eps, comp.schedule.alpha_prev[1]), rtol=1e-4, atol=1e-4)


def test_rgg_at_scale_zero_is_plain_ddim_and_guidance_raises_the_score(unet_with_two_adapters):
    x_T, batch = inputs(unet_with_two_adapters, seed=8, batch=4)
    plain = composer(unet_with_two_adapters, rgg_scale=0.0)
    chain, nfe = sample("rgg", plain, [0.5, 0.5], x_T, batch, score=brightness)
    torch.testing.assert_close(chain.latents, reference_chain(plain, x_T, batch, 3), rtol=1e-5, atol=1e-5)
    assert nfe == 3 * 4, "a forward and a backward (two forwards) per step"
    guided, _ = sample(
        "rgg", composer(unet_with_two_adapters, rgg_scale=0.5), [0.5, 0.5], x_T, batch, score=brightness
    )
    gain = brightness(guided.latents) - brightness(chain.latents)  # same x_T and noise: paired
    assert (gain > 0).all(), gain


def test_rewarded_soup_with_one_hot_weights_is_the_single_model(unet_with_two_adapters):
    import copy

    from peft import get_peft_model_state_dict

    from training.card import LORA_TARGETS, LoraSpec

    unet = copy.deepcopy(unet_with_two_adapters)
    comp = composer(unet)
    for m in comp.models:
        m.lora = get_peft_model_state_dict(unet, adapter_name=m.objective)
        m.targets = LORA_TARGETS
        m.card = SimpleNamespace(lora=LoraSpec(rank=4, targets=LORA_TARGETS))
    x_T, batch = inputs(unet, seed=9)
    METHODS["rs"].prepare(comp, [0.0, 1.0])
    chain, nfe = sample("rs", comp, [0.0, 1.0], x_T, batch)
    single, _ = sample("msdda", comp, [0.0, 1.0], x_T, batch)
    torch.testing.assert_close(chain.latents, single.latents, rtol=1e-4, atol=1e-4)
    assert nfe == 4


@pytest.mark.parametrize("method", ["msdda", "db", "rs"])
def test_a_target_beta_scales_the_coefficients(unet_with_two_adapters, method):
    """``lam_i = w_i beta_i / beta``: halving the target beta is doubling the weights, with no retraining."""
    import copy

    from peft import get_peft_model_state_dict

    from training.card import LORA_TARGETS, LoraSpec

    unet = copy.deepcopy(unet_with_two_adapters)
    plain, halved = composer(unet), composer(unet, beta=0.005)
    for comp in (plain, halved):
        for m in comp.models:
            m.lora = get_peft_model_state_dict(unet, adapter_name=m.objective)
            m.targets = LORA_TARGETS
            m.card = SimpleNamespace(lora=LoraSpec(rank=4, targets=LORA_TARGETS))
    x_T, batch = inputs(unet, seed=5)
    results = []
    for comp, weights in ((plain, [0.6, 0.3]), (halved, [0.3, 0.15])):
        if METHODS[method].prepare is not None:
            METHODS[method].prepare(comp, weights)
        results.append(sample(method, comp, weights, x_T, batch)[0].latents)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        halved.coefficients([0.3, 0.15])[0], torch.tensor([0.6, 0.3], dtype=torch.float64)
    )


def test_differing_betas_need_a_target_beta(unet_with_two_adapters):
    comp = composer(unet_with_two_adapters)
    comp.models[1].beta = 0.02
    with pytest.raises(ValueError, match="composition.beta"):
        comp.coefficients([0.5, 0.5])
    targeted = composer(unet_with_two_adapters, beta=0.02)
    targeted.models[1].beta = 0.02
    torch.testing.assert_close(
        targeted.coefficients([0.5, 0.5])[0], torch.tensor([0.25, 0.5], dtype=torch.float64)
    )


def test_registry_lists_every_method_once_and_the_docs_table_is_current():

    from composition.methods import methods_table

    assert list(METHODS) == ["msdda", "db", "rs", "code", "rgg"]
    docs = (REPO / "docs" / "adding-a-method.md").read_text()
    assert methods_table() in docs, "docs/adding-a-method.md: paste `python -m composition.methods` output"


def test_the_docs_worked_example_runs_as_a_registered_method(unet_with_two_adapters, monkeypatch):
    """docs/adding-a-method.md: its function and registry line, executed as written."""
    import re

    from composition import methods

    text = (REPO / "docs" / "adding-a-method.md").read_text()
    function, line = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[:2]
    namespace = vars(methods).copy()
    exec(function, namespace)  # noqa: S102 - the documented example, run as a user would paste it
    method = eval(line.strip().rstrip(","), namespace)
    monkeypatch.setitem(methods.METHODS, method.name, method)
    comp = composer(unet_with_two_adapters, log_variance={})
    x_T, batch = inputs(comp.unet, seed=10)
    chain, nfe = sample(method.name, comp, [0.5, 0.5], x_T, batch)
    doubled, _ = sample("msdda", comp, [1.0, 1.0], x_T, batch)
    torch.testing.assert_close(chain.latents, doubled.latents)
    assert nfe == 3 * 4
