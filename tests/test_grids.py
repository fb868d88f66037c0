"""Image grids a person can read: upscaled (nearest neighbour), labelled with the prompt and each objective's
reward, and a sweep's grid with a row per weight vector; written through a temporary file and a rename."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from composition.evaluation import GRID_MIN_TILE, image_grid, sweep_grid

PROMPTS = ["a handwritten digit seven", "handwritten three", "a handwritten digit five"]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def rewards(n: int, offset: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "digit_alignment": torch.linspace(-1, 0, n) + offset,
        "ink_economy": torch.linspace(-0.3, -0.2, n) + offset,
    }


def test_grid_is_upscaled_nearest_neighbour_and_written_atomically(tmp_path):
    batch = images(10)
    path = image_grid(batch, tmp_path / "grid.png", columns=4)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind
    scale = GRID_MIN_TILE // 16
    first = (batch[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    expected = first.repeat(scale, axis=0).repeat(scale, axis=1)  # every sample pixel a 6x6 block
    assert np.array_equal(grid[6 : 6 + GRID_MIN_TILE, 6 : 6 + GRID_MIN_TILE], expected)
    # 10 images in 4 columns: 3 rows of at least 96-pixel tiles
    assert grid.shape[0] >= 3 * GRID_MIN_TILE and grid.shape[1] >= 4 * GRID_MIN_TILE
    assert grid.shape[0] < 4 * GRID_MIN_TILE


def test_labels_are_drawn_under_each_image(tmp_path):
    batch = images(3)
    plain = np.asarray(Image.open(image_grid(batch, tmp_path / "plain.png")).convert("L"))
    labelled = np.asarray(
        Image.open(image_grid(batch, tmp_path / "a.png", PROMPTS, rewards(3), title="msdda w = 0.3, 0.7"))
    ).copy()
    other = np.asarray(Image.open(image_grid(batch, tmp_path / "b.png", PROMPTS, rewards(3, offset=0.5))))
    assert labelled.shape[0] > plain.shape[0] + 3 * 14  # a title, a prompt and two reward lines
    assert (plain < 128).sum() < (np.asarray(Image.open(tmp_path / "a.png").convert("L")) < 128).sum()
    # the same tiles, different rewards: the pixels under the tiles differ, the tiles do not
    untitled = np.asarray(Image.open(image_grid(batch, tmp_path / "c.png", PROMPTS, rewards(3))))
    assert untitled.shape == other.shape
    tile = (slice(6, 6 + GRID_MIN_TILE), slice(6, 6 + GRID_MIN_TILE))
    caption = (slice(6 + GRID_MIN_TILE, untitled.shape[0]), slice(0, untitled.shape[1]))
    assert np.array_equal(untitled[tile], other[tile])
    assert not np.array_equal(untitled[caption], other[caption])
    assert (untitled[caption] < 100).any()  # dark text on the white background


def solid(color: tuple[int, int, int], n: int) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32).div(255).view(1, 3, 1, 1).expand(n, 3, 16, 16).clone()


def tile_starts(grid: np.ndarray, colors, tiles: int, axis: int) -> list[int]:
    """Where each solid colour's tiles start along ``axis`` (0: the row, 1: the column), checking that each
    colour fills ``tiles`` whole tiles that all lie in one row (``axis=0``) or one column (``axis=1``)."""
    starts = []
    for color in colors:
        mask = np.all(grid == color, axis=-1)
        assert mask.sum() == tiles * GRID_MIN_TILE**2, color
        span = np.nonzero(mask.any(axis=1 - axis))[0]
        assert span[-1] - span[0] + 1 == GRID_MIN_TILE
        starts.append(span[0])
    return starts


def test_sweep_grid_has_a_row_per_weight_vector(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    weights = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    points = [(w, solid(c, 8), rewards(8)) for w, c in zip(weights, colors)]
    path = sweep_grid(points, PROMPTS * 3, tmp_path / "sweep.png", columns=4, title="msdda")
    grid = np.asarray(Image.open(path).convert("RGB"))
    rows_of = tile_starts(grid, colors, tiles=4, axis=0)  # 4 columns of one full tile each, in one row
    assert rows_of == sorted(rows_of)  # the weights in grid order, top to bottom
    # the row labels name the weights: the left margin holds text, and the labels differ per row
    label = grid[:, :40]
    assert (label < 100).all(axis=-1).any()
    relabelled = sweep_grid(
        [([0.2, 0.8], *p[1:]) for p in points], PROMPTS * 3, tmp_path / "other.png", columns=4, title="msdda"
    )
    assert not np.array_equal(np.asarray(Image.open(relabelled).convert("RGB")), grid)


def test_weight_row_has_a_column_per_weight_vector_headed_by_its_mean_rewards(tmp_path):
    from composition.evaluation import weight_row

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    weights = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    points = [(w, solid(c, 8), rewards(8)) for w, c in zip(weights, colors)]
    path = weight_row(points, tmp_path / "row.png", rows=2, title="msdda")
    grid = np.asarray(Image.open(path).convert("RGB"))
    columns_of = tile_starts(grid, colors, tiles=2, axis=1)  # 2 rows of one full tile each, in one column
    assert columns_of == sorted(columns_of)  # the weight vectors left to right
    # the headers carry the means: other rewards, other pixels above the tiles
    top = min(np.nonzero(np.all(grid == colors[0], axis=-1).any(axis=1))[0])
    shifted = [(w, images, {k: v + 1.0 for k, v in r.items()}) for w, images, r in points]
    other = np.asarray(Image.open(weight_row(shifted, tmp_path / "other.png", rows=2, title="msdda")))
    assert not np.array_equal(other[:top], grid[:top])
