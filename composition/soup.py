"""The rewarded soup (design.md §3.4), exactly: K LoRA base models merged into one LoRA whose delta is the
weighted sum of theirs, loaded as one adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_lora_states(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Rewarded soup, exactly: one LoRA whose delta on each module is ``sum_i w_i B_i A_i`` over the models
    that adapt that module (one that does not adds nothing), of rank ``sum r_i`` over those models.

    ``A = [A_1; ...; A_K]`` (stacked rows) and ``B = [w_1 B_1, ..., w_K B_K]`` (stacked columns), so
    ``B A = sum_i w_i B_i A_i``; for a convolution too, whose delta kernel is the same sum over the rank
    (:func:`composition.batched.lora_delta`). Load it with each module's rank (:func:`lora_ranks`, the
    ``ranks`` of :func:`composition.batched.load_adapter`) and ``lora_alpha = rank`` (scaling 1); fold each
    model's own LoRA scaling ``alpha_i / r_i`` into its weight.
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} adapters but {len(weights)} weights")
    merged = {}
    for key in dict.fromkeys(key for state in states for key in state):
        if ".lora_A." in key:
            partner = key.replace(".lora_A.", ".lora_B.")
        elif ".lora_B." in key:
            partner = key.replace(".lora_B.", ".lora_A.")
        else:
            raise ValueError(f"cannot merge LoRA entry {key}")
        present = [(state, float(w)) for state, w in zip(states, weights) if key in state]
        if any(partner not in state for state, _ in present):
            raise ValueError(f"cannot merge LoRA entry {key}: an adapter holds it without {partner}")
        if ".lora_A." in key:
            merged[key] = torch.cat([state[key] for state, _ in present], dim=0)
        else:
            merged[key] = torch.cat([w * state[key] for state, w in present], dim=1)
    return merged


def lora_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each adapted module's rank in a peft LoRA state dict: module name -> rows of its ``lora_A``."""
    return {key.split(".lora_A.")[0]: value.shape[0] for key, value in state.items() if ".lora_A." in key}
