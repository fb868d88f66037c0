"""Slow end-to-end checks on the real embedded default (minutes on 2 cores; `make test-slow`, run in CI)."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

pytestmark = pytest.mark.slow

OBJECTIVES = ("digit_alignment", "ink_economy")


@pytest.fixture(scope="module")
def default_config():
    from configs import load_config

    return load_config()


@pytest.fixture(scope="module")
def default_reference(default_config, tmp_path_factory):
    """The embedded default, pretrained into a fresh home: ``(home, PretrainResult)``."""
    from training.reference.embedded import pretrain_reference

    home = tmp_path_factory.mktemp("default_home")
    return home, pretrain_reference(default_config, home, progress=False)


def _train_single_threaded(config, objective, home):
    from training.base_model import train_base_model
    from training.device import configure_threads

    configure_threads(1)
    return train_base_model(config, objective, home, progress=False)


@pytest.fixture(scope="module")
def default_base_models(default_config, default_reference):
    """Both default base models, trained at once in two processes of one torch thread each, as `msdda run`
    trains them on 2 idle cores: that takes less time than one after the other with two threads."""
    home, _ = default_reference
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(OBJECTIVES), mp_context=spawn) as pool:
        futures = {o: pool.submit(_train_single_threaded, default_config, o, home) for o in OBJECTIVES}
        return {name: future.result() for name, future in futures.items()}


def test_default_model_meets_the_quality_bar(default_reference):
    """>= 80% of 500 DDIM (eta=1) samples show the prompted digit; the evaluator CNN is >= 95% accurate."""
    _, result = default_reference
    assert result.classifier_test_accuracy >= 0.95
    assert result.alignment_accuracy >= 0.80


@pytest.mark.timeout(1800)  # the first also waits for both trainings: about 14 minutes on 2 cores
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_default_objectives_train_and_rise(default_base_models, objective):
    """Each default base model raises its reward by more than 3 standard errors on 256 held-out samples."""
    result = default_base_models[objective]
    assert not result.cached
    assert result.rise_in_se > 3, result
    assert result.kl > 0
