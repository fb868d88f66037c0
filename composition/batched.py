"""One batched UNet forward for K LoRA base models (plus the reference), routed by slice.

The batch is the K (+1) slices stacked; the rows of slice ``k`` go through adapter ``k`` (``"__base__"`` means
no adapter, i.e. the reference). Inside :func:`mixed_adapter_batch` every LoRA layer computes its K slices
at once, in one of two ways (``composition.routed_weights``):

* ``merged`` (default): each slice's merged weight ``W_k = W + s_k Delta_k``, built once per routing: exactly
  the work of the plain layer, so a composed step costs about one plain UNet forward of ``K * B`` rows, the
  physical floor. Memory: K copies of the adapted layers' weights.
* ``lora``: the base layer's output plus the K low-rank deltas: no extra weight memory, but two more passes
  over each adapted layer's activations.

Linear layers (``A [r, in]``, ``B [out, r]``): ``Delta_k = B_k A_k``; ``merged`` gives
``y_k = x_k W_k^T + b`` (one batched matmul) and ``lora`` ``y_k = x_k W^T + b + s_k x_k A_k^T B_k^T``.

Convolutions (peft's ``lora.Conv2d``: ``A`` a conv ``[r, in, kh, kw]`` with the base layer's kernel, stride
and padding, ``B`` a 1x1 conv ``[out, r, 1, 1]``): ``Delta_k[o, i] = sum_j B_k[o, j] A_k[j, i]`` over the
kernel positions (peft's ``get_delta_weight``), so ``conv(x, W_k) = conv(x, W) + s_k B_k(A_k(x))``. The K
slices run as one grouped convolution: slice ``k``'s rows become channel group ``k``
(``[copies, K, B, C, H, W] -> [copies * B, K * C, H, W]``, ``groups = K``), with ``merged`` kernels
``[K * out, in, kh, kw]``, or for ``lora`` the base conv plus the grouped ``A`` conv and the grouped 1x1 ``B``
conv. Routing supports ungrouped, undilated, zero-padded convolutions (every one of a diffusers UNet). On the
2-core CPU (default embedded UNet, broad set, K = 2 + reference, CFG) the grouped convolution was as fast as
or faster than one convolution per slice at every batch tried (8 to 128 rows per slice).

A layer that lacks adapter ``k`` (base models with different target sets) computes slice ``k`` with its base
weight, as that model's own forward does; a layer that lacks every routed adapter is its plain base layer.

Both replace peft's per-adapter gather and scatter (about 2x slower here).
"""

from __future__ import annotations

import re
import types
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F

from training.card import LoraSpec
from training.sd_problem import load_lora_state_dict

REFERENCE = "__base__"
RoutedWeights = Literal["merged", "lora"]


def load_adapter(
    unet, name: str, lora_state: dict[str, torch.Tensor], spec: LoraSpec, ranks: dict[str, int] | None = None
) -> None:
    """Add a LoRA adapter called ``name`` with ``spec``'s rank, alpha and targets to ``unet`` and load its
    weights (a peft state dict without prefix). ``ranks`` (module name -> rank, e.g. :func:`lora_ranks` of the
    rewarded soup) overrides ``spec.rank`` per module, with ``alpha = rank`` there when ``spec.alpha`` is
    unset. Drops the cached routed weights (:func:`clear_stacked`)."""
    from peft import LoraConfig

    kwargs = spec.lora_config_kwargs()
    if ranks:
        # peft reads these keys as regular expressions matching the end of a module's name
        pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != spec.rank}
        kwargs["rank_pattern"] = pattern
        if spec.alpha is None:
            kwargs["alpha_pattern"] = dict(pattern)
    clear_stacked(unet)
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings(
            "ignore",
            message="Already found a `peft_config` attribute",
            category=UserWarning,
            module=r"peft\.",
        )
        unet.add_adapter(LoraConfig(**kwargs), adapter_name=name)
    load_lora_state_dict(unet, lora_state, adapter_name=name)


@contextmanager
def mixed_adapter_batch(unet, adapter_names: Sequence[str], weights: RoutedWeights = "merged"):
    """Within the block, every UNet forward routes row ``i`` through ``adapter_names[i]``.

    The rows must come in contiguous slices, one per adapter (:func:`routing`); a batch that is a whole
    multiple of ``len(adapter_names)`` (classifier-free guidance stacks the batch twice) repeats the routing
    per copy. ``weights`` picks how each LoRA layer computes its slices (module docstring): ``merged``,
    ``y_k = x_k (W + s_k B_k A_k)^T + b``, or ``lora``, ``y_k = x_k W^T + b + s_k x_k A_k^T B_k^T`` (the
    reference slice: ``x W^T + b``; convolutions likewise). A layer without adapter ``k`` gives slice ``k``
    its base output; an adapter the UNet does not hold is a ``ValueError``.

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
    known = getattr(unet, "peft_config", None) or {}
    for name in slices:
        if name != REFERENCE and name not in known:
            raise ValueError(f"no adapter named '{name}' on this UNet")
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
    full fingerprint and rebuilds only what changed. A layer that holds none of the routed adapters gets the
    route ``("base", ...)``: its base layer."""
    cache = unet.__dict__.setdefault("_msdda_routes", {})
    key = (weights, total, *slices)
    entry = cache.get(key)
    if entry is not None and entry[0] is layers and entry[3] == _signature(entry[1], entry[2]):
        return entry[4]
    routes, tensors, scalings = [], [], []
    for module in layers:
        own = _layer_slices(module, slices)
        if own is None:
            routes.append(("base", None, None, total))
            continue
        routes.append((weights, *stacked_weights(module, own, weights), total))
        tensors += _source_tensors(module, own)
        scalings += [(module.scaling, name) for name in own if name != REFERENCE]
    cache[key] = (layers, tensors, scalings, _signature(tensors, scalings), routes)
    return routes


def _layer_slices(module, slices: list[str]) -> list[str] | None:
    """``slices`` as ``module`` computes them: an adapter the layer does not hold is its base weight
    (:data:`REFERENCE`), as peft's forward skips it; ``None`` when the layer holds none of them."""
    own = [name if name in module.lora_A else REFERENCE for name in slices]
    return None if all(name == REFERENCE for name in own) else own


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
    LoRA on linear layers and on ungrouped, undilated, zero-padded 2D convolutions
    (:func:`_check_routable`)."""
    from peft.tuners.lora import LoraLayer

    config = getattr(unet, "peft_config", None)
    key = tuple(config) if isinstance(config, dict) else None
    cached = unet.__dict__.get("_msdda_layers")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    for module in layers:
        _check_routable(module)
    if key is not None:
        unet.__dict__["_msdda_layers"] = (key, layers)
    return layers


def _check_routable(module) -> None:
    """A ``TypeError`` unless ``module`` is a peft LoRA layer the routed forward computes exactly: a linear
    layer, or a 2D convolution whose LoRA delta is one kernel on the base layer's geometry (peft builds ``A``
    with the base stride and padding, but dilation 1 and zero padding)."""
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import Linear as LoraLinear

    base = module.base_layer
    if isinstance(module, LoraLinear):
        return
    if (
        isinstance(module, LoraConv2d)
        and base.groups == 1
        and tuple(base.dilation) == (1, 1)
        and base.padding_mode == "zeros"
    ):
        return
    raise TypeError(
        "batched routing supports LoRA on linear layers and on ungrouped, undilated, zero-padded 2D "
        f"convolutions only, not on {base!r}"
    )


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
    ``_msdda_route`` ``(kind, first, second, rows per copy)``; outside it, peft's forward. Kind ``base``: the
    base layer; a convolution: :func:`_routed_conv`.

    ``merged``: ``first`` is the merged ``W_k`` ``[n, out, in]`` and ``second`` the bias; the output of slice
    ``k`` is ``x_k W_k^T + b`` (one batched matmul; the plain layer's own matmul when ``n = 1``).
    ``lora``: ``first`` is ``A [n, r, in]`` and ``second`` ``s B [n, out, r]``; the output is the base
    layer's plus ``x_k A_k^T (s B_k)^T``.
    """
    route = getattr(self, "_msdda_route", None)
    if route is None:
        return type(self).forward(self, x, *args, **kwargs)
    kind, first, second, total = route
    if kind == "base":
        return self.base_layer(x, *args, **kwargs)
    rows = x.shape[0]
    if rows % total:
        raise ValueError(f"batch of {rows} rows does not split into {total} routed rows per copy")
    if first.dim() > 3:
        return _routed_conv(self, x, kind, first, second, rows // total)
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


def _routed_conv(self, x: torch.Tensor, kind: str, first, second, copies: int) -> torch.Tensor:
    """The routed slices of a LoRA convolution, as one grouped convolution over the ``n`` slices (slice ``k``
    is channel group ``k``: :func:`_to_groups`), with the base layer's stride and padding.

    ``merged``: ``first`` is the merged kernels ``[n, out, in, kh, kw]`` and ``second`` the bias repeated
    ``n`` times (the bias itself when ``n = 1``, which is the plain convolution). ``lora``: ``first`` is
    ``A [n, r, in, kh, kw]`` and ``second`` ``s B [n, out, r, 1, 1]``; the output is the base layer's plus
    the grouped ``A`` conv followed by the grouped 1x1 ``s B`` conv.
    """
    base, n = self.base_layer, first.shape[0]
    if kind == "merged" and n == 1:
        return F.conv2d(x.to(first.dtype), first[0], second, stride=base.stride, padding=base.padding)
    xs = _to_groups(x.to(first.dtype), copies, n)
    if kind == "merged":
        out = F.conv2d(xs, first.flatten(0, 1), second, stride=base.stride, padding=base.padding, groups=n)
        return _from_groups(out, copies, n)
    output = base(x)
    hidden = F.conv2d(xs, first.flatten(0, 1), stride=base.stride, padding=base.padding, groups=n)
    delta = F.conv2d(hidden, second.flatten(0, 1), groups=n)
    return output + _from_groups(delta, copies, n).to(output.dtype)


def _to_groups(x: torch.Tensor, copies: int, n: int) -> torch.Tensor:
    """``[copies * n * b, C, H, W]`` (``n`` slices of ``b`` rows per copy) -> ``[copies * b, n * C, H, W]``
    (slice ``k`` is channel group ``k``)."""
    rows, channels, *spatial = x.shape
    b = rows // (copies * n)
    grouped = x.reshape(copies, n, b, channels, *spatial).transpose(1, 2)
    return grouped.reshape(copies * b, n * channels, *spatial)


def _from_groups(y: torch.Tensor, copies: int, n: int) -> torch.Tensor:
    """:func:`_to_groups` inverted: ``[copies * b, n * C, H, W]`` -> ``[copies * n * b, C, H, W]``."""
    rows, channels, *spatial = y.shape
    b, c = rows // copies, channels // n
    return y.reshape(copies, b, n, c, *spatial).transpose(1, 2).reshape(copies * n * b, c, *spatial)


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
    """``merged``: ``(W_k [n, out, in, ...], bias)`` with ``W_k = W + s_k Delta_k`` (``W`` for the reference;
    :func:`lora_delta`), summed in fp32 and stored in the base weight's dtype; a convolution's bias is
    repeated ``n`` times (:func:`_routed_conv`). ``lora``: ``(A [n, r, in, ...], s B [n, out, r, ...])``,
    zeros for the reference, padded to the largest rank."""
    known = set(module.lora_A.keys())
    for name in slices:
        if name != REFERENCE and name not in known:
            raise ValueError(f"no adapter named '{name}' on this UNet")
    weight, bias = module.base_layer.weight, module.base_layer.bias
    if weights == "merged":
        merged = []
        for name in slices:
            w = weight.float()
            if name != REFERENCE:
                w = w + module.scaling[name] * lora_delta(module, name)
            merged.append(w.to(weight.dtype))
        if weight.dim() > 2 and bias is not None:
            bias = bias.repeat(len(slices))
        return torch.stack(merged), bias
    r = max(module.lora_A[name].weight.shape[0] for name in slices if name != REFERENCE)
    a = weight.new_zeros(len(slices), r, *weight.shape[1:])
    bw = weight.new_zeros(len(slices), weight.shape[0], r, *[1] * (weight.dim() - 2))  # a conv's B is 1x1
    for i, name in enumerate(slices):
        if name == REFERENCE:
            continue
        rank = module.lora_A[name].weight.shape[0]
        a[i, :rank] = module.lora_A[name].weight.detach()
        bw[i, :, :rank] = module.lora_B[name].weight.detach() * module.scaling[name]
    return a, bw


def lora_delta(module, name: str) -> torch.Tensor:
    """Adapter ``name``'s ``Delta = B A`` on a LoRA layer, unscaled and in fp32, as peft's
    ``get_delta_weight`` computes it: ``B @ A`` for a linear layer; for a convolution the kernel
    ``Delta[o, i] = sum_j B[o, j] A[j, i]`` (``B [out, r, 1, 1]`` a 1x1 conv after ``A [r, in, kh, kw]``)."""
    a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
    if a.dim() == 2:
        return b @ a
    if a.shape[2:] == (1, 1):
        return (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None]
    return F.conv2d(a.transpose(0, 1), b).transpose(0, 1)


def compile_unet(unet, backend: str = "inductor"):
    """``torch.compile`` of ``unet``'s forward for routed steps (``composition.compile``): mode
    ``reduce-overhead`` (CUDA graphs) on CUDA, the default mode elsewhere (inductor needs a C++ compiler on
    the CPU). The routed forward is put on every LoRA layer first (:func:`install_routing`), so the compiled
    code always holds it. Call it once per UNet and reuse the result. ``backend`` is torch.compile's (tests
    use ``"eager"``: dynamo's tracing and guards without codegen).

    Shapes are static (``dynamic=False``): a composition has few (one per routing and batch size), and CUDA
    graphs record one per shape anyway, while dynamo's automatic dynamic shapes, on the first re-routing,
    trace the grouped convolutions' reshapes symbolically: measured on the tiny UNet with conv adapters
    (CPU, backend ``eager``), a re-routing took over 390 s to trace, against 12 s with static shapes."""
    install_routing(unet)
    if backend != "inductor":
        return torch.compile(unet, backend=backend, dynamic=False)
    mode = "reduce-overhead" if unet.device.type == "cuda" else "default"
    return torch.compile(unet, mode=mode, dynamic=False)


def routing(names: Sequence[str], batch_size: int) -> list[str]:
    """``[n_1] * B + [n_2] * B + ...``: the routing for K slices of ``batch_size`` rows."""
    return [name for name in names for _ in range(batch_size)]
