"""Run by test_distributed.py under torchrun (2 processes, gloo on CPU) or as a plain single process: train
the toy, dump each process's trainable weights before and after training.

Each process initialises its toy from its own seed, so the processes start from different weights: only the
trainer's broadcast of rank 0's weights and its gradient averaging can make them end equal.
"""

import json
import sys

import torch
from accelerate import PartialState

from configs import TrainConfig
from training.analysis.toy import ToyProblem
from training.trainer import train


def _weights(problem: ToyProblem) -> dict[str, list[float]]:
    return {k: v.flatten().tolist() for k, v in problem.trainable_state().items()}


if __name__ == "__main__":
    out = sys.argv[1]
    state = PartialState(cpu=True)  # as the trainer asks for on a machine without GPUs
    torch.manual_seed(1000 + state.process_index)
    problem = ToyProblem(num_inference_steps=4)
    initial = _weights(problem)
    config = TrainConfig(iterations=3, batch_size=8, states_per_trajectory=2, num_actions=4)
    train(problem, config, progress=False)
    with open(f"{out}/rank{state.process_index}.json", "w") as handle:
        json.dump({"world": state.num_processes, "initial": initial, "weights": _weights(problem)}, handle)
