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
    weights (a peft state dict without prefix). Drops the cached stacked weights (:func:`clear_stacked`)."""
    from peft import LoraConfig, set_peft_model_state_dict

    clear_stacked(unet)
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

    The stacked weights of a routing are built once and cached on each layer (:func:`stacked_weights`), so
    entering the block every denoising step costs no rebuild; each layer carries one routing hook for good
    (:func:`_routed_deltas`, a no-op outside the block), so a compiled UNet (:func:`compile_unet`) sees the
    same hooks on every call.
    """
    names = list(adapter_names)
    slices, _ = _slices(names)
    layers = lora_layers(unet)
    for module in layers:
        if _routed_deltas not in module._forward_hooks.values():
            module.register_forward_hook(_routed_deltas)
    if all(name == REFERENCE for name in slices):
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    for module in layers:
        a, bw = stacked_weights(module, slices)
        module._msdda_route = (a, bw, len(names))
    unet.disable_adapters()  # the base layer's output only; the hook adds the routed deltas
    try:
        yield
    finally:
        unet.enable_adapters()
        for module in layers:
            module._msdda_route = None


def lora_layers(unet) -> list:
    """The UNet's peft LoRA layers; routing supports LoRA on linear layers only."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if any(not isinstance(m, LoraLinear) for m in layers):
        raise TypeError("batched routing supports LoRA on linear layers only")
    return layers


def _routed_deltas(module, args, output):
    """The forward hook of a LoRA layer: inside :func:`mixed_adapter_batch`, the output plus each slice's
    delta from the layer's ``_msdda_route`` ``(A [n, r, in], s B [n, out, r], rows per copy)``; outside it,
    nothing (``None`` keeps the output)."""
    route = getattr(module, "_msdda_route", None)
    if route is None:
        return None
    a, bw, total = route
    x = args[0]
    rows = x.shape[0]
    if rows % total:
        raise ValueError(f"batch of {rows} rows does not split into {total} routed rows per copy")
    n = a.shape[0]
    xs = x.reshape(rows // total, n, -1, x.shape[-1]).to(a.dtype)  # [copies, n, b * tokens, in]
    delta = torch.einsum("cnti,nri->cntr", xs, a)
    delta = torch.einsum("cntr,nor->cnto", delta, bw)
    return output + delta.reshape(output.shape).to(output.dtype)


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


def _fingerprint(module, slices: list[str]) -> tuple:
    """What the stacked weights of ``slices`` are built from: each adapter's A and B (identity, storage and
    version counter, which every in-place write bumps), its scaling, and the base weight's dtype and
    device."""
    weight = module.base_layer.weight
    parts: list = [weight.dtype, weight.device]
    for name in slices:
        if name == REFERENCE:
            parts.append(name)
            continue
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        parts.append((name, module.scaling[name]))
        parts.extend((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in (a, b))
    return tuple(parts)


def stacked_weights(module, slices: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_stacked_weights` of ``slices``, cached on ``module`` per routing and rebuilt only when an
    adapter's weights, scaling, dtype or device changed since (:func:`_fingerprint`)."""
    cache = module.__dict__.setdefault("_msdda_stacked_cache", {})
    key, fingerprint = tuple(slices), _fingerprint(module, slices)
    entry = cache.get(key)
    if entry is None or entry[0] != fingerprint:
        entry = cache[key] = (fingerprint, *_stacked_weights(module, slices))
    return entry[1], entry[2]


def clear_stacked(unet) -> None:
    """Drop every cached stacked weight of ``unet`` (called wherever adapters are added or loaded)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.__dict__.pop("_msdda_stacked_cache", None)


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
    with torch.no_grad():
        for i, name in enumerate(slices):
            if name == REFERENCE:
                continue
            rank = module.lora_A[name].weight.shape[0]
            a[i, :rank] = module.lora_A[name].weight.detach()
            bw[i, :, :rank] = module.lora_B[name].weight.detach() * module.scaling[name]
    return a, bw


def compile_unet(unet, backend: str = "inductor"):
    """``torch.compile`` of ``unet``'s forward for routed steps (``composition.compile``): mode
    ``reduce-overhead`` (CUDA graphs) on CUDA, the default mode elsewhere (inductor needs a C++ compiler on
    the CPU). The routing hooks are put on every LoRA layer first, so the compiled code always holds them
    (they do nothing outside :func:`mixed_adapter_batch`). Call it once per UNet and reuse the result.
    ``backend`` is torch.compile's (tests use ``"eager"``: dynamo's tracing and guards without codegen)."""
    for module in lora_layers(unet):
        if _routed_deltas not in module._forward_hooks.values():
            module.register_forward_hook(_routed_deltas)
    if backend != "inductor":
        return torch.compile(unet, backend=backend)
    mode = "reduce-overhead" if unet.device.type == "cuda" else "default"
    return torch.compile(unet, mode=mode)


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
