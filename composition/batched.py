"""One batched UNet forward for K LoRA base models (plus the reference), routed by slice.

The batch is the K (+1) slices stacked; the rows of slice ``k`` go through adapter ``k`` (``"__base__"`` means
no adapter, i.e. the reference). Inside :func:`mixed_adapter_batch` every LoRA layer computes its K slices
with one batched matmul, in one of two ways (``composition.routed_weights``):

* ``merged`` (default): each slice's merged weight ``W + s_k B_k A_k``, built once per routing: exactly the
  work of the plain layer (one matmul of the same size), so a composed step costs one plain UNet forward of
  ``K * B`` rows, the physical floor. Memory: K copies of the adapted layers' weights.
* ``lora``: the base layer's output plus the K low-rank deltas (two batched matmuls over the slices): no extra
  weight memory, but two more passes over each adapted layer's activations.

Both replace peft's per-adapter gather and scatter (about 2x slower here).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F

from training.card import LoraSpec

REFERENCE = "__base__"
RoutedWeights = Literal["merged", "lora"]


def load_adapter(unet, name: str, lora_state: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Add a LoRA adapter called ``name`` with ``spec``'s rank, alpha and targets to ``unet`` and load its
    weights (a peft state dict without prefix). Drops the cached routed weights (:func:`clear_stacked`)."""
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
def mixed_adapter_batch(unet, adapter_names: Sequence[str], weights: RoutedWeights = "merged"):
    """Within the block, every UNet forward routes row ``i`` through ``adapter_names[i]``.

    The rows must come in contiguous slices, one per adapter (:func:`routing`); a batch that is a whole
    multiple of ``len(adapter_names)`` (classifier-free guidance stacks the batch twice) repeats the routing
    per copy. ``weights`` picks how each LoRA layer computes its slices (module docstring): ``merged``,
    ``y_k = x_k (W + s_k B_k A_k)^T + b``, or ``lora``, ``y_k = x_k W^T + b + s_k x_k A_k^T B_k^T`` (the
    reference slice: ``x W^T + b``).

    The routed weights of a routing are built once and cached on each layer (:func:`stacked_weights`), so
    entering the block every denoising step costs no rebuild. Each LoRA layer carries the routed forward for
    good (:func:`install_routing`; outside the block it is peft's own), so a compiled UNet
    (:func:`compile_unet`) sees the same code on every call. A routing of the reference alone is the plain
    UNet (adapters disabled).
    """
    if weights not in ("merged", "lora"):
        raise ValueError(f"routed weights are 'merged' or 'lora', got {weights!r}")
    names = list(adapter_names)
    slices, _ = _slices(names)
    layers = install_routing(unet)
    if all(name == REFERENCE for name in slices):
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    for module, route in zip(layers, _routes(unet, layers, slices, weights, len(names))):
        module.__dict__["_msdda_route"] = route  # a plain attribute: skips nn.Module's slower __setattr__
    try:
        yield
    finally:
        for module in layers:
            module.__dict__["_msdda_route"] = None


def _routes(unet, layers: list, slices: list[str], weights: RoutedWeights, total: int) -> list[tuple]:
    """Each layer's ``_msdda_route`` for a routing. Entering the block every denoising step must cost
    next to nothing (on a GPU, small batches wait for the CPU): the routes are kept on the UNet with the
    tensors they were built from, and reused while none of those was written to or moved (version counters
    and storage) and no adapter's scaling changed. Otherwise each layer's :func:`stacked_weights` checks its
    full fingerprint and rebuilds only what changed."""
    cache = unet.__dict__.setdefault("_msdda_routes", {})
    key = (weights, total, *slices)
    entry = cache.get(key)
    if entry is not None and entry[0] is layers and entry[3] == _signature(entry[1], entry[2]):
        return entry[4]
    routes = [(weights, *stacked_weights(module, slices, weights), total) for module in layers]
    tensors = [t for module in layers for t in _source_tensors(module, slices)]
    scalings = [(module.scaling, name) for module in layers for name in slices if name != REFERENCE]
    cache[key] = (layers, tensors, scalings, _signature(tensors, scalings), routes)
    return routes


def _source_tensors(module, slices: list[str]) -> list[torch.Tensor]:
    """The tensors a layer's routed weights are built from: base weight and bias, each adapter's A and B."""
    base = module.base_layer
    tensors = [base.weight] + ([base.bias] if base.bias is not None else [])
    for name in slices:
        if name != REFERENCE:
            tensors += [module.lora_A[name].weight, module.lora_B[name].weight]
    return tensors


def _signature(tensors: list[torch.Tensor], scalings: list[tuple[dict, str]]) -> tuple[list, list]:
    return [(t._version, t.data_ptr()) for t in tensors], [scaling[name] for scaling, name in scalings]


def lora_layers(unet) -> list:
    """The UNet's peft LoRA layers (kept on the UNet until its set of adapters changes); routing supports
    LoRA on linear layers only."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = getattr(unet, "peft_config", None)
    key = tuple(config) if isinstance(config, dict) else None
    cached = unet.__dict__.get("_msdda_layers")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if any(not isinstance(m, LoraLinear) for m in layers):
        raise TypeError("batched routing supports LoRA on linear layers only")
    if key is not None:
        unet.__dict__["_msdda_layers"] = (key, layers)
    return layers


def install_routing(unet) -> list:
    """Give every LoRA layer of ``unet`` the routed forward (:func:`_routed_forward`), once; returns the
    layers."""
    layers = lora_layers(unet)
    for module in layers:
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(_routed_forward, module)
    return layers


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's forward: inside :func:`mixed_adapter_batch`, the routed slices from the layer's
    ``_msdda_route`` ``(kind, first, second, rows per copy)``; outside it, peft's forward.

    ``merged``: ``first`` is the merged ``W_k`` ``[n, out, in]`` and ``second`` the bias; the output of slice
    ``k`` is ``x_k W_k^T + b`` (one batched matmul; the plain layer's own matmul when ``n = 1``).
    ``lora``: ``first`` is ``A [n, r, in]`` and ``second`` ``s B [n, out, r]``; the output is the base
    layer's plus ``x_k A_k^T (s B_k)^T``.
    """
    route = getattr(self, "_msdda_route", None)
    if route is None:
        return type(self).forward(self, x, *args, **kwargs)
    kind, first, second, total = route
    rows = x.shape[0]
    if rows % total:
        raise ValueError(f"batch of {rows} rows does not split into {total} routed rows per copy")
    n = first.shape[0]
    if kind == "merged" and n == 1:
        return F.linear(x.to(first.dtype), first[0], second)
    xs = x.reshape(rows // total, n, -1, x.shape[-1]).to(first.dtype)  # [copies, n, b * tokens, in]
    if kind == "merged":
        weight_t = first.transpose(1, 2)  # a view: the batched matmul reads it transposed
        if xs.shape[0] == 1:
            out = torch.bmm(xs[0], weight_t) if second is None else torch.baddbmm(second, xs[0], weight_t)
        else:
            out = torch.matmul(xs, weight_t) if second is None else torch.matmul(xs, weight_t) + second
        return out.reshape(*x.shape[:-1], out.shape[-1])
    output = self.base_layer(x, *args, **kwargs)
    delta = torch.einsum("cnti,nri->cntr", xs, first)
    delta = torch.einsum("cntr,nor->cnto", delta, second)
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
    """What the routed weights of ``slices`` are built from: the base weight and bias and each adapter's A
    and B (identity, storage and version counter, which every in-place write bumps), each adapter's scaling,
    and the base weight's dtype and device."""
    weight = module.base_layer.weight
    parts: list = [weight.dtype, weight.device]
    parts.extend(name if name == REFERENCE else (name, module.scaling[name]) for name in slices)
    parts.extend((id(p), p.data_ptr(), p._version) for p in _source_tensors(module, slices))
    return tuple(parts)


def stacked_weights(module, slices: list[str], weights: RoutedWeights = "merged") -> tuple:
    """The routed weights of ``slices`` (:func:`_stacked_weights`), cached on ``module`` per routing and kind
    and rebuilt only when a weight, scaling, dtype or device changed since (:func:`_fingerprint`)."""
    cache = module.__dict__.setdefault("_msdda_stacked_cache", {})
    key, fingerprint = (weights, *slices), _fingerprint(module, slices)
    entry = cache.get(key)
    if entry is None or entry[0] != fingerprint:
        entry = cache[key] = (fingerprint, *_stacked_weights(module, slices, weights))
    return entry[1], entry[2]


def clear_stacked(unet) -> None:
    """Drop every cached routed weight and route of ``unet`` (called wherever adapters are added or loaded;
    call it after replacing a weight tensor object rather than writing into it)."""
    from peft.tuners.lora import LoraLayer

    unet.__dict__.pop("_msdda_routes", None)
    unet.__dict__.pop("_msdda_layers", None)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.__dict__.pop("_msdda_stacked_cache", None)


@torch.no_grad()
def _stacked_weights(module, slices: list[str], weights: RoutedWeights) -> tuple:
    """``merged``: ``(W_k [n, out, in], bias)`` with ``W_k = W + s_k B_k A_k`` (``W`` for the reference),
    summed in fp32 and stored in the base weight's dtype. ``lora``: ``(A [n, r, in], s B [n, out, r])``, zeros
    for the reference, padded to the largest rank."""
    known = set(module.lora_A.keys())
    for name in slices:
        if name != REFERENCE and name not in known:
            raise ValueError(f"no adapter named '{name}' on this UNet")
    weight = module.base_layer.weight
    if weights == "merged":
        merged = []
        for name in slices:
            w = weight.float()
            if name != REFERENCE:
                delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
                w = w + module.scaling[name] * delta
            merged.append(w.to(weight.dtype))
        return torch.stack(merged), module.base_layer.bias
    r = max(module.lora_A[name].weight.shape[0] for name in slices if name != REFERENCE)
    a = weight.new_zeros(len(slices), r, weight.shape[1])
    bw = weight.new_zeros(len(slices), weight.shape[0], r)
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
    the CPU). The routed forward is put on every LoRA layer first (:func:`install_routing`), so the compiled
    code always holds it. Call it once per UNet and reuse the result. ``backend`` is torch.compile's (tests
    use ``"eager"``: dynamo's tracing and guards without codegen)."""
    install_routing(unet)
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
