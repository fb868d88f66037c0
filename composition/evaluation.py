"""The Pareto evaluation: weight grids, Pareto fronts, hypervolume, the sweep over methods, and its plots.

All rewards are maximised. The hypervolume is measured against a reference point (the reference model's mean
rewards): only the part of the front that beats the reference model on every objective counts.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from composition.engine import Ensemble, generate, score_generated
from composition.methods import METHODS
from configs.schema import CompositionConfig
from training.images import to_uint8
from training.rewards import mean_and_se
from training.storage import atomic_file


def simplex_grid(num_objectives: int, points_per_edge: int) -> list[list[float]]:
    """All ``w >= 0`` with ``sum w = 1`` and every ``w_i`` a multiple of ``1 / (points_per_edge - 1)``.

    ``(2, 11)`` gives ``(0, 1), (0.1, 0.9), ..., (1, 0)``; ``(3, n)`` gives ``n (n + 1) / 2`` points.
    """
    if num_objectives < 1 or points_per_edge < 2:
        raise ValueError("need at least one objective and two points per edge")
    steps = points_per_edge - 1
    grid = []
    for counts in itertools.product(range(steps + 1), repeat=num_objectives - 1):
        if sum(counts) <= steps:
            grid.append([c / steps for c in counts] + [(steps - sum(counts)) / steps])
    return sorted(grid)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (maximisation)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points."""
    return [
        i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Lebesgue measure of ``{y : reference <= y <= p for some p in points}`` (maximisation), exactly.

    Slices along the last objective (HSO): the volume is the sum over consecutive levels ``z_k`` of
    ``(z_k - z_{k+1}) * HV_{d-1}({p : p_d >= z_k})``. Points that do not beat ``reference`` everywhere add 0.
    """
    ref = [float(r) for r in reference]
    kept = [[float(v) for v in p] for p in points if all(v > r for v, r in zip(p, ref))]
    if not kept:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in kept) - ref[0]
    levels = sorted({p[-1] for p in kept}, reverse=True)
    total = 0.0
    for k, level in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else ref[-1]
        slab = [p[:-1] for p in kept if p[-1] >= level]
        total += (level - below) * hypervolume(slab, ref[:-1])
    return total


def hypervolume_se(
    per_image: Sequence[torch.Tensor], reference: Sequence[float], replicates: int = 200, seed: int = 0
) -> float:
    """Bootstrap standard error of :func:`hypervolume` over images: each replicate resamples the image
    indices (the same for every point, as the points share prompts and seeds) and recomputes the front's
    hypervolume from the resampled means. ``per_image``: one ``[N, K]`` reward tensor per point."""
    generator = torch.Generator().manual_seed(seed)
    n = per_image[0].shape[0]
    values = []
    for _ in range(replicates):
        index = torch.randint(0, n, (n,), generator=generator)
        values.append(hypervolume([p[index].mean(0).tolist() for p in per_image], reference))
    return float(torch.tensor(values, dtype=torch.float64).std())


def regularised_objective(combined: torch.Tensor, path_kl: torch.Tensor, beta: float) -> tuple[float, float]:
    """``J_w = E[sum_i w_i r_i] - beta * E[KL(path || reference path)]`` (docs/design.md §4.5), with its
    standard error over images; ``combined`` holds each image's ``sum_i w_i r_i``."""
    return mean_and_se(combined.double() - beta * path_kl.double())


def sweep(
    ensemble: Ensemble,
    options: CompositionConfig,
    methods: Sequence[str] | None = None,
    grid: int | None = None,
    num_images: int | None = None,
    on_point: Callable[[str, list[float], dict], None] | None = None,
    progress: bool = False,
) -> dict:
    """Every method at every weight on the simplex grid, same prompts and seeds.

    Returns ``{"objectives", "reference": {"rewards", "reward_se"}, "methods": {name: {"hypervolume",
    "hypervolume_se", "front", "points": [{"weights", "rewards", "reward_se", "nfe", "reward_calls",
    "seconds"} (+ "kl", "J", "J_se", "combined" with ``options.path_kl``)]}}, "settings"}``; the sampled
    images of each point go to ``on_point(method or "reference", weights, {"images", "prompts", "rewards"})``
    if given (``rewards``: objective -> per-image values).
    """
    from tqdm.auto import tqdm

    methods = list(methods or options.methods or METHODS)
    weights_grid = simplex_grid(len(ensemble.models), grid or options.grid)
    objectives = ensemble.objectives
    num_images = num_images or options.num_images

    betas = {m.beta for m in ensemble.models}
    target_beta = options.beta if options.beta is not None else (betas.pop() if len(betas) == 1 else None)
    scales = [m.card.reward_scale for m in ensemble.models]
    per_image: dict[str, list[torch.Tensor]] = {}

    def evaluate(method: str, weights: list[float], label: str | None = None) -> dict:
        generated = generate(ensemble, method, weights, options, num_images=num_images)
        rewards = score_generated(ensemble, generated)
        stats = {name: mean_and_se(values) for name, values in rewards.items()}
        per_image.setdefault(label or method, []).append(torch.stack([rewards[n] for n in objectives], 1))
        if on_point is not None:
            on_point(
                label or method,
                weights,
                {"images": generated.images, "prompts": generated.prompts, "rewards": rewards},
            )
        point = {
            "weights": weights,
            "rewards": {k: v[0] for k, v in stats.items()},
            "reward_se": {k: v[1] for k, v in stats.items()},
            "nfe": generated.nfe_per_image,
            "reward_calls": generated.reward_calls_per_image,
            "seconds": round(generated.seconds, 3),
        }
        if generated.path_kl is not None and target_beta is not None:
            combined = sum(w * s.standardise(rewards[n]) for w, s, n in zip(weights, scales, objectives))
            j, j_se = regularised_objective(combined, generated.path_kl, target_beta)
            point.update(kl=float(generated.path_kl.mean()), J=j, J_se=j_se, combined=float(combined.mean()))
        return point

    start = time.perf_counter()
    reference = evaluate("msdda", [0.0] * len(objectives), "reference")  # w = 0: the reference model
    reference_point = [reference["rewards"][name] for name in objectives]
    result = {
        "objectives": objectives,
        "reference": {k: reference[k] for k in ("rewards", "reward_se", "nfe", "seconds")},
        "methods": {},
    }
    bar = tqdm(total=len(methods) * len(weights_grid), desc="sweep", disable=not progress, unit="point")
    for method in methods:
        points = []
        for weights in weights_grid:
            bar.set_postfix_str(f"{method} w={','.join(f'{w:g}' for w in weights)}")
            points.append(evaluate(method, weights))
            bar.update()
        vectors = [[p["rewards"][name] for name in objectives] for p in points]
        result["methods"][method] = {
            "hypervolume": hypervolume(vectors, reference_point),
            "hypervolume_se": hypervolume_se(per_image[method], reference_point),
            "front": pareto_front(vectors),
            "max_nfe": max(p["nfe"] for p in points),
            "points": points,
        }
    bar.close()
    result["settings"] = {
        "grid": len(weights_grid),
        "num_images": num_images,
        "seed": options.seed,
        "code_candidates": options.code_candidates,
        "code_block": options.code_block,
        "rgg_scale": options.rgg_scale,
        "beta": target_beta,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return result


# ------------------------------------------------------------------------------------------------------ plots


def plot_fronts(result: dict, path: Path, extra: dict[str, list[dict]] | None = None) -> Path:
    """Each method's points (front highlighted, weights annotated) in the plane of the first two objectives,
    with the reference model as a star; ``extra`` adds labelled point sets (e.g. the oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = result["objectives"][:2]
    fig, ax = plt.subplots(figsize=(7.5, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = {**{m: v["points"] for m, v in result["methods"].items()}, **(extra or {})}
    for (method, points), color in zip(series.items(), itertools.cycle(colors)):
        xs = [p["rewards"][x_name] for p in points]
        ys = [p["rewards"][y_name] for p in points]
        front = set(pareto_front(list(zip(xs, ys))))
        order = sorted(range(len(points)), key=lambda i: xs[i])
        hv = result["methods"].get(method, {}).get("hypervolume")
        label = (METHODS[method].label if method in METHODS else method) + (
            f" (HV {hv:.3g})" if hv is not None else ""
        )
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "-", color=color, alpha=0.35)
        ax.scatter(xs, ys, s=[40 if i in front else 14 for i in range(len(xs))], color=color, label=label)
        if method == "msdda":
            for p, x, y in zip(points, xs, ys):
                ax.annotate(
                    f"{p['weights'][0]:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    ref = result["reference"]["rewards"]
    ax.scatter(
        [ref[x_name]], [ref[y_name]], marker="*", s=220, color="black", label="reference model", zorder=5
    )
    ax.set_xlabel(f"{x_name} (mean reward)")
    ax.set_ylabel(f"{y_name} (mean reward)")
    settings = result.get("settings", {})
    ax.set_title(
        f"Pareto fronts, {settings.get('num_images', '?')} images per point (labels: w_{x_name})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save_figure(fig, path)


GRID_MIN_TILE = 96
"""Grids upscale each image (nearest neighbour) to at least this many pixels a side."""


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib) at ``size`` pixels; PIL's default font if it is missing."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(size)


def _tiles(images: torch.Tensor, min_tile: int) -> list:
    """PIL images of ``images`` ([N, C, H, W] in [0, 1]), upscaled by the smallest integer factor that makes
    them at least ``min_tile`` pixels high (nearest neighbour: every sample pixel stays a sharp block)."""
    from PIL import Image

    array = to_uint8(images)
    scale = max(1, math.ceil(min_tile / array.shape[1]))
    mode = "L" if array.shape[3] == 1 else "RGB"
    return [
        Image.fromarray(a[..., 0] if mode == "L" else a, mode)
        .convert("RGB")
        .resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
        for a in array
    ]


def _wrap(text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """``text`` in at most ``max_lines`` lines that fit ``width`` pixels (the last one cut, with …)."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines, rest = lines[:max_lines], " ".join(lines[max_lines - 1 :])
        while rest and font.getlength(rest + "…") > width:
            rest = rest[:-1]
        lines[-1] = rest + "…"
    return lines


def _weights_label(weights: Sequence[float]) -> str:
    return "w = " + ", ".join(f"{w:g}" for w in weights)


def _reward_lines(rewards: dict[str, torch.Tensor] | None, index: int) -> list[str]:
    return [f"{name} {float(values[index]):+.3f}" for name, values in (rewards or {}).items()]


def _labelled_grid(
    cells: list[list[tuple[object, list[str], list[str]]]],
    row_labels: list[str] | None = None,
    column_labels: list[str | list[str]] | None = None,
    title: str | None = None,
):
    """Draw a grid of cells; each cell is ``(tile, texts, lines)``: under the tile, ``texts`` wrapped to the
    cell's width, then ``lines`` as they are (the cell is as wide as the widest of them).

    Rows may have labels on the left, columns a header on top (a string: wrapped to the cell width, two
    lines at most; a list: its lines as they are), the whole a title. Returns the PIL image (white
    background, black text).
    """
    from PIL import Image, ImageDraw

    font, title_font = _font(11), _font(13)
    pad, line_height = 6, 14
    tile_w = max(tile.width for row in cells for tile, _, _ in row)
    tile_h = max(tile.height for row in cells for tile, _, _ in row)
    plain = [line for row in cells for _, _, lines in row for line in lines]
    plain += [line for label in column_labels or [] if isinstance(label, list) for line in label]
    cell_w = max([tile_w, 120] + [math.ceil(font.getlength(line)) for line in plain])
    # each cell's caption: its wrapped texts (the prompt), then its plain lines (the rewards)
    captions = [
        [[*(x for t in texts for x in _wrap(t, font, cell_w)), *lines] for _, texts, lines in row]
        for row in cells
    ]
    caption_lines = max((len(caption) for row in captions for caption in row), default=0)
    cell_h = tile_h + (caption_lines * line_height + 4 if caption_lines else 0)
    label_w = max([0] + [math.ceil(font.getlength(label)) + pad for label in row_labels or []])
    headers = [
        label if isinstance(label, list) else _wrap(label, font, cell_w) for label in column_labels or []
    ]
    header_h = max([0] + [len(h) * line_height + 4 for h in headers])
    title_h = line_height + 8 if title else 0
    columns = max(len(row) for row in cells)
    width = pad + label_w + columns * (cell_w + pad)
    if title:
        width = max(width, 2 * pad + math.ceil(title_font.getlength(title)))
    height = pad + title_h + header_h + len(cells) * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=title_font)
    top = pad + title_h
    for c, header in enumerate(headers):
        x = pad + label_w + c * (cell_w + pad)
        for k, line in enumerate(header):
            draw.text((x, top + k * line_height), line, fill="black", font=font)
    top += header_h
    for r, row in enumerate(cells):
        y = top + r * (cell_h + pad)
        if row_labels:
            draw.text((pad, y + tile_h // 2 - line_height // 2), row_labels[r], fill="black", font=font)
        for c, (tile, _, _) in enumerate(row):
            x = pad + label_w + c * (cell_w + pad)
            canvas.paste(tile, (x, y))
            for k, line in enumerate(captions[r][c]):
                draw.text((x, y + tile_h + 2 + k * line_height), line, fill="black", font=font)
    return canvas


def image_grid(
    images: torch.Tensor,
    path: Path,
    prompts: Sequence[str] | None = None,
    rewards: dict[str, torch.Tensor] | None = None,
    columns: int = 8,
    max_images: int = 64,
    min_tile: int = GRID_MIN_TILE,
    title: str | None = None,
) -> Path:
    """A PNG grid of the first ``max_images`` images, upscaled (nearest neighbour) to at least ``min_tile``
    pixels, each labelled with its prompt and its reward under every objective (``rewards``: name -> [N]
    per-image values) when given; written to a temporary file and renamed into place."""
    count = min(len(images), max_images)
    tiles = _tiles(images[:count], min_tile)
    cells = [
        (tile, [prompts[i]] if prompts is not None else [], _reward_lines(rewards, i))
        for i, tile in enumerate(tiles)
    ]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    return _save_image(_labelled_grid(rows, title=title), path)


def sweep_grid(
    points: Sequence[tuple[Sequence[float], torch.Tensor, dict[str, torch.Tensor]]],
    prompts: Sequence[str],
    path: Path,
    columns: int = 6,
    min_tile: int = GRID_MIN_TILE,
    title: str | None = None,
) -> Path:
    """One PNG for a method's sweep: a row per weight vector (labelled ``w = ...``), a column per image
    index (the points share prompts and initial noise: column ``j`` is the same prompt and seed in every
    row, headed by its prompt), each cell labelled with its rewards. ``points``: ``(weights, images,
    rewards)`` with ``rewards`` name -> per-image values."""
    count = min(columns, min(len(images) for _, images, _ in points))
    rows = [
        [(tile, [], _reward_lines(rewards, i)) for i, tile in enumerate(_tiles(images[:count], min_tile))]
        for _, images, rewards in points
    ]
    labels = [_weights_label(weights) for weights, _, _ in points]
    headers = [f"#{i}: {prompts[i]}" for i in range(count)]
    return _save_image(_labelled_grid(rows, labels, headers, title), path)


def weight_row(
    points: Sequence[tuple[Sequence[float], torch.Tensor, dict[str, torch.Tensor]]],
    path: Path,
    rows: int = 3,
    min_tile: int = GRID_MIN_TILE,
    title: str | None = None,
) -> Path:
    """One prompt across the weight vectors (the README's picture): a column per weight vector, headed by
    ``w = ...`` and the mean of each reward over all of the column's images, and a row per image index (the
    points share the initial noise and the step noise: a row is one seed). ``points``: ``(weights, images,
    rewards)`` with ``rewards`` name -> per-image values."""
    count = min(rows, min(len(images) for _, images, _ in points))
    columns = [_tiles(images[:count], min_tile) for _, images, _ in points]
    cells = [[(column[r], [], []) for column in columns] for r in range(count)]
    headers = [
        [_weights_label(weights)]
        + [f"{name} {float(values.mean()):+.3f}" for name, values in rewards.items()]
        for weights, _, rewards in points
    ]
    return _save_image(_labelled_grid(cells, None, headers, title), path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return Path(path)


def _save_image(image, path: Path) -> Path:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
