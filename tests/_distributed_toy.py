"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`: train the toy, dump weights."""

import json
import sys

import torch
from accelerate import PartialState

from configs import TrainConfig
from training.toy import ToyProblem
from training.trainer import train

if __name__ == "__main__":
    out = sys.argv[1]
    state = PartialState(cpu=True)  # as the trainer asks for on a machine without GPUs
    problem = ToyProblem(num_inference_steps=4)
    train(problem, TrainConfig(iterations=3, batch_size=8, states_per_trajectory=2, num_actions=4), progress=False)
    weights = torch.cat([v.flatten() for v in problem.trainable_state().values()])
    with open(f"{out}/rank{state.process_index}.json", "w") as handle:
        json.dump({"world": state.num_processes, "weights": weights.tolist()}, handle)
