"""A small CNN digit classifier: the quality check of the embedded model and the `digit_alignment` reward."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from configs.errors import first_line
from training.reference.digits import DigitSplit
from training.step.kernel import draw_noise


class DigitCNN(nn.Module):
    """Grayscale ``[N, 1, S, S]`` in [0, 1] -> logits over the ten digits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * width, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (in 8x8 units) plus pixel noise, for robustness to generated
    digits."""
    size = images.shape[-1]
    max_shift = max(1, size // 8)
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    out = torch.roll(images, shifts=shifts, dims=(2, 3))
    out = out + 0.1 * draw_noise(out.shape, generator, device=out.device)
    return out.clamp(0, 1)


@dataclass(frozen=True)
class ClassifierReport:
    test_accuracy: float
    steps: int


def train_classifier(
    train: DigitSplit,
    test: DigitSplit,
    steps: int,
    seed: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[DigitCNN, ClassifierReport]:
    """Adam on cross-entropy with augmentation, on ``device`` (random draws come from a CPU generator, so a
    seed means the same batches on any device); reports accuracy on the held-out ``test`` split. The model
    comes back on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitCNN().to(device)
    images, labels = train.images.to(device), train.labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="digit classifier", disable=not progress, leave=False):
        idx = torch.randint(0, len(train.labels), (128,), generator=generator).to(device)
        loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    test_accuracy = accuracy(model, test.images.to(device), test.labels.to(device))
    return model.cpu(), ClassifierReport(test_accuracy=test_accuracy, steps=steps)


@torch.no_grad()
def accuracy(model: DigitCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(-1) == labels).float().mean().item()


def to_grayscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """RGB ``[N, 3, H, W]`` in [0, 1] -> ``[N, 1, size, size]`` in [0, 1], the classifier's input."""
    gray = images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images
    if gray.shape[-1] != size:
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return gray.clamp(0, 1)


def save_classifier(model: DigitCNN, report: ClassifierReport, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "classifier.json").write_text(json.dumps(report.__dict__, indent=2))


def load_classifier(directory: Path) -> tuple[DigitCNN, ClassifierReport]:
    """The evaluator CNN saved in ``directory``; a missing or unreadable file raises
    :class:`training.storage.ModelLoadError` naming it (one line)."""
    from safetensors import SafetensorError

    from training.storage import ModelLoadError, raise_unless_content_fault

    model = DigitCNN()
    path = directory / "model.safetensors"
    try:
        model.load_state_dict(load_file(path))
        path = directory / "classifier.json"
        report = ClassifierReport(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise_unless_content_fault(exc, path)  # removing the folder is advice for damaged content only
        raise ModelLoadError(
            f"cannot load the evaluator CNN from {path}: {first_line(exc)}; remove {directory} to retrain it"
        ) from None
    return model.eval(), report
