"""benchmarks/weight_row.py (the README's picture) on the tiny model: the two tiny base models through
MSDDAPipeline, the means as JSON, and the picture. (Training the missing base models is train_base_model's,
tested on its own.)"""

import math

from PIL import Image

from tests.helpers import run_benchmark


def test_weight_row_on_the_tiny_model(tiny_home, tiny_base_models, tiny_config_file, tmp_path):
    out = tmp_path / "row.png"
    args = ["--config", str(tiny_config_file), "--images", "4", "--rows", "2", "--out", str(out), "--json"]
    args += ["--models", *map(str, tiny_base_models)]
    result = run_benchmark("weight_row.py", args, tiny_home, timeout=600)
    assert [p["weights"] for p in result["points"]] == [
        [0, 0],
        [1, 0],
        [0.75, 0.25],
        [0.5, 0.5],
        [0.25, 0.75],
        [0, 1],
    ]
    for point in result["points"]:
        for name in ("digit_alignment", "ink_economy"):
            mean, se = point[name]
            assert math.isfinite(mean) and se >= 0
    # w = (0, 0) is the reference: its column differs from the first base model's (random LoRA weights here)
    assert result["points"][0] != result["points"][1]
    assert result["path"] == str(out)
    width, height = Image.open(out).size
    assert width > 6 * 96 and height > 2 * 96  # six columns, two rows of upscaled tiles
