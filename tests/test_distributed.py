"""Several processes (torchrun on CPU with gloo here; `accelerate launch --multi_gpu` on GPUs sets up the same
process group): every process starts from rank 0's weights and gradients are averaged, so every process ends
with the same weights though each draws its own states."""

import json
from pathlib import Path

import torch

from tests.helpers import REPO, run_python, subprocess_env

TOY = str(REPO / "tests" / "_distributed_toy.py")


def _run(args: list[str], out: Path) -> list[dict]:
    out.mkdir()
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HOME=out / "hf")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = run_python([*args, TOY, str(out)], env)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def _flat(weights: dict[str, list[float]]) -> torch.Tensor:
    return torch.tensor([w for name in sorted(weights) for w in weights[name]])


def test_two_processes_stay_in_sync(tmp_path):
    ranks = _run(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"], tmp_path / "two"
    )
    assert len(ranks) == 2 and all(r["world"] == 2 for r in ranks)
    start0, start1 = _flat(ranks[0]["initial"]), _flat(ranks[1]["initial"])
    end0, end1 = _flat(ranks[0]["weights"]), _flat(ranks[1]["weights"])
    assert not torch.equal(start0, start1), "the processes start apart (else this shows nothing)"
    assert torch.equal(end0, end1), "every process ends with the same weights"
    assert not torch.equal(end0, start0), "training moved the weights"
    # the MLP's zero-initialised last layer is where the trained correction lives
    last = [name for name in ranks[0]["weights"] if name.startswith("eps_model.net.4.")]
    assert last and all(not any(ranks[0]["initial"][name]) for name in last)
    assert any(any(ranks[0]["weights"][name]) for name in last)

    # One process alone, from the same start as rank 0 (same init seed) and with rank 0's own states, ends
    # elsewhere: rank 1's gradients were averaged in, not dropped (nor were rank 0's weights merely copied).
    (alone,) = _run([], tmp_path / "one")
    assert alone["world"] == 1 and torch.equal(_flat(alone["initial"]), start0)
    assert not torch.equal(_flat(alone["weights"]), end0)
