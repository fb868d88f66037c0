"""One batched UNet forward for K LoRA base models (plus the reference): peft's mixed-adapter batches.

The batch is the K (+1) slices stacked; row ``i`` goes through adapter ``adapter_names[i]`` (``"__base__"``
means no adapter, i.e. the reference). This is the physical floor of MSDDA's cost per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

REFERENCE = "__base__"


def load_adapter(unet, name: str, lora_state: dict[str, torch.Tensor], rank: int, targets: Sequence[str]) -> None:
    """Add a LoRA adapter called ``name`` to ``unet`` and load its weights (safetensors state dict)."""
    from peft import LoraConfig, set_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), adapter_name=name)
    result = set_peft_model_state_dict(unet, lora_state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter '{name}' does not fit this UNet: unexpected keys such as {unexpected[0]}")


@contextmanager
def mixed_adapter_batch(unet, adapter_names: Sequence[str]):
    """Within the block, every UNet forward routes row ``i`` through ``adapter_names[i]``.

    A batch that is a whole multiple of ``len(adapter_names)`` (classifier-free guidance stacks the batch twice)
    repeats the routing for each copy.
    """
    from peft.tuners.lora import LoraLayer

    names = list(adapter_names)

    def route(module, args, kwargs):
        rows = args[0].shape[0] if args else kwargs["x"].shape[0]
        if rows % len(names):
            raise ValueError(f"batch of {rows} rows does not split into {len(names)} routed slices")
        kwargs["adapter_names"] = names * (rows // len(names))
        return args, kwargs

    handles = [m.register_forward_pre_hook(route, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def routing(names: Sequence[str], batch_size: int) -> list[str]:
    """``[n_1] * B + [n_2] * B + ...``: the routing for K slices of ``batch_size`` rows."""
    return [name for name in names for _ in range(batch_size)]


def merge_lora_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Rewarded soup, exactly: one LoRA of rank ``sum r_i`` whose delta is ``sum_i w_i B_i A_i``.

    ``A = [A_1; ...; A_K]`` (stacked rows) and ``B = [w_1 B_1, ..., w_K B_K]`` (stacked columns), so
    ``B A = sum_i w_i B_i A_i``. Load it with ``rank = sum r_i`` and ``lora_alpha = rank`` (scaling 1, as for
    the base models, which use ``lora_alpha = r``).
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} adapters but {len(weights)} weights")
    merged = {}
    for key in states[0]:
        if ".lora_A." in key:
            merged[key] = torch.cat([s[key] for s in states], dim=0)
        elif ".lora_B." in key:
            merged[key] = torch.cat([float(w) * s[key] for s, w in zip(states, weights)], dim=1)
        else:
            raise ValueError(f"cannot merge LoRA entry {key}")
    return merged
