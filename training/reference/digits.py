"""The shipped data: scikit-learn's 8x8 handwritten digits, with prompts that name the digit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "a hand drawn number {word}",
    "the digit {word} written by hand",
    "a picture of the number {word}",
    "handwritten {word}",
)


def digit_prompt(digit: int, template: int = 0) -> str:
    """``digit_prompt(7) == "a handwritten digit seven"``; ``template`` picks a paraphrase."""
    return PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[digit])


def default_prompts() -> list[str]:
    """Every digit in every template: the training and evaluation prompts of the embedded default."""
    return [digit_prompt(d, t) for d in range(10) for t in range(len(PROMPT_TEMPLATES))]


def prompt_vocabulary() -> list[str]:
    """Every word the prompts use, in a fixed order."""
    words: list[str] = []
    for template in PROMPT_TEMPLATES:
        for word in template.replace("{word}", " ").split():
            if word not in words:
                words.append(word)
    return words + [w for w in DIGIT_WORDS if w not in words]


@dataclass(frozen=True)
class DigitSplit:
    images: torch.Tensor  # [N, 1, S, S] in [0, 1]
    labels: torch.Tensor  # [N] int64


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """The raw 8x8 digits (values 0..16) and labels, as shipped inside scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def data_fingerprint() -> str:
    """A hash of the shipped data, part of every cache key built on it."""
    images, labels = load_digits_array()
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]


def upsample_digits(images: torch.Tensor, size: int) -> torch.Tensor:
    """8x8 digits in 0..16 -> ``[N, 1, size, size]`` in [0, 1] (bilinear)."""
    x = (images / 16.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


def train_test_split(size: int, test_fraction: float, seed: int = 0) -> tuple[DigitSplit, DigitSplit]:
    """A stratified split of the shipped digits, at ``size`` x ``size`` pixels."""
    from sklearn.model_selection import train_test_split as split

    images, labels = load_digits_array()
    idx_train, idx_test = split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    tensors = upsample_digits(torch.from_numpy(images), size)
    target = torch.from_numpy(labels)
    return (
        DigitSplit(tensors[idx_train], target[idx_train]),
        DigitSplit(tensors[idx_test], target[idx_test]),
    )
