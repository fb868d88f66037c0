"""One batched UNet forward for K LoRA base models (plus the reference), routed by slice.

The batch is the K (+1) slices stacked; the rows of slice ``k`` go through adapter ``k`` (``"__base__"`` means
no adapter, i.e. the reference). Each LoRA layer adds the K deltas with two batched matmuls over the slices
instead of peft's per-adapter gather and scatter (about 2x slower here), so a composed step costs one UNet
forward of ``K * B`` rows: the physical floor of MSDDA's cost per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from training.card import LoraSpec

REFERENCE = "__base__"


def load_adapter(unet, name: str, lora_state: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Add a LoRA adapter called ``name`` with ``spec``'s rank, alpha and targets to ``unet`` and load its
    weights (a peft state dict without prefix)."""
    from peft import LoraConfig, set_peft_model_state_dict

    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(LoraConfig(**spec.lora_config_kwargs()), adapter_name=name)
    result = set_peft_model_state_dict(unet, lora_state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter '{name}' does not fit this UNet: unexpected keys such as {unexpected[0]}")


@contextmanager
def mixed_adapter_batch(unet, adapter_names: Sequence[str]):
    """Within the block, every UNet forward routes row ``i`` through ``adapter_names[i]``.

    The rows must come in contiguous slices, one per adapter (:func:`routing`); a batch that is a whole
    multiple of ``len(adapter_names)`` (classifier-free guidance stacks the batch twice) repeats the routing
    per copy. Each LoRA layer then adds its K deltas with two batched matmuls over the slices
    (``delta_k = scaling_k * x_k A_k^T B_k^T``, the reference slice contributing 0): the cost of one LoRA
    forward, where peft's mixed batches gather and scatter rows per adapter and layer.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    names = list(adapter_names)
    slices, b = _slices(names)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if any(not isinstance(m, LoraLinear) for m in layers):
        raise TypeError("batched routing supports LoRA on linear layers only")
    if all(name == REFERENCE for name in slices):
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return

    def add_deltas(module, args, output):
        x = args[0]
        rows = x.shape[0]
        if rows % len(names):
            raise ValueError(f"batch of {rows} rows does not split into {len(names)} routed slices")
        a, bw = module._msdda_stacked  # [n, r, in], [n, out, r]
        n = a.shape[0]
        xs = x.reshape(rows // (n * b), n, -1, x.shape[-1]).to(a.dtype)  # [copies, n, b * tokens, in]
        delta = torch.einsum("cnti,nri->cntr", xs, a)
        delta = torch.einsum("cntr,nor->cnto", delta, bw)
        return output + delta.reshape(output.shape).to(output.dtype)

    handles = []
    for module in layers:
        module._msdda_stacked = _stacked_weights(module, slices)
        handles.append(module.register_forward_hook(add_deltas))
    unet.disable_adapters()  # the base layer's output only; the hook adds the routed deltas
    try:
        yield
    finally:
        unet.enable_adapters()
        for module, handle in zip(layers, handles):
            handle.remove()
            del module._msdda_stacked


def _slices(names: list[str]) -> tuple[list[str], int]:
    """``routing(slices, b)`` inverted: the adapter of each contiguous slice, and the slice size."""
    slices = [names[0]]
    for name in names[1:]:
        if name != slices[-1]:
            slices.append(name)
    b = len(names) // len(slices)
    if routing(slices, b) != names:
        raise ValueError("adapter names must come in equal contiguous slices (see `routing`)")
    return slices, b


def _stacked_weights(module, slices: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [n, r, in]`` and ``scaling * B [n, out, r]`` per slice (zeros for the reference), padded to max
    rank."""
    known = set(module.lora_A.keys())
    for name in slices:
        if name != REFERENCE and name not in known:
            raise ValueError(f"no adapter named '{name}' on this UNet")
    ranks = [module.lora_A[name].weight.shape[0] for name in slices if name != REFERENCE]
    r = max(ranks)
    weight = module.base_layer.weight
    a = weight.new_zeros(len(slices), r, weight.shape[1])
    bw = weight.new_zeros(len(slices), weight.shape[0], r)
    for i, name in enumerate(slices):
        if name == REFERENCE:
            continue
        rank = module.lora_A[name].weight.shape[0]
        a[i, :rank] = module.lora_A[name].weight.detach()
        bw[i, :, :rank] = module.lora_B[name].weight.detach() * module.scaling[name]
    return a, bw


def routing(names: Sequence[str], batch_size: int) -> list[str]:
    """``[n_1] * B + [n_2] * B + ...``: the routing for K slices of ``batch_size`` rows."""
    return [name for name in names for _ in range(batch_size)]


def merge_lora_states(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Rewarded soup, exactly: one LoRA of rank ``sum r_i`` whose delta is ``sum_i w_i B_i A_i``.

    ``A = [A_1; ...; A_K]`` (stacked rows) and ``B = [w_1 B_1, ..., w_K B_K]`` (stacked columns), so
    ``B A = sum_i w_i B_i A_i``. Load it with ``rank = sum r_i`` and ``lora_alpha = rank`` (scaling 1); fold
    each model's own LoRA scaling ``alpha_i / r_i`` into its weight.
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
