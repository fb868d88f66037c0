"""Composing registered base models at denoising time (docs/design.md §2-§4), for any weight vector.

``msdda``
    The closed form: the composition coefficients and the composed Gaussian step (imports only torch).
``methods``
    The method registry: MSDDA and the baselines, each a kernel function or a procedure around the chain.
``batched``
    K adapters (and the reference) through one UNet call: routing, stacked weights, ``compile_unet``.
``soup``
    The rewarded-soup merge of LoRA states.
``engine``
    Composition on demand: cards read, lineage checked, adapters loaded, images generated and scored.
``evaluation``
    Weight grids, Pareto fronts, hypervolume, the sweep over methods, plots and image grids.
``pipeline``
    ``MSDDAPipeline``, composition as a diffusers pipeline for use from Python.
"""
