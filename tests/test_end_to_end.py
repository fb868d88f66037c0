"""Slow end-to-end checks on the real embedded default (minutes on 2 cores; `make test-slow`, run in CI)."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_home(tmp_path_factory):
    return tmp_path_factory.mktemp("default_home")


@pytest.fixture(scope="module")
def default_config():
    from configs import load_config

    return load_config()


def test_default_model_meets_the_quality_bar(default_config, default_home):
    """>= 80% of 500 DDIM (eta=1) samples show the prompted digit; the evaluator CNN is >= 95% accurate."""
    from training.embedded import pretrain_reference

    result = pretrain_reference(default_config, default_home, progress=False)
    assert result.classifier_test_accuracy >= 0.95
    assert result.alignment_accuracy >= 0.80


@pytest.mark.parametrize("objective", ["digit_alignment", "ink_economy"])
def test_default_objectives_train_and_rise(default_config, default_home, objective):
    """Each default base model raises its reward by more than 3 standard errors on 256 held-out samples."""
    from training.base_model import train_base_model

    result = train_base_model(default_config, objective, default_home, progress=False)
    assert result.rise_in_se > 3, result
    assert result.kl > 0
