"""Training single-objective LoRA base models with step-level KL-regularised RL (docs/design.md §1.5).

The package has four rooms; imports run downward only (analysis → base model → step maths, reference):

``training.reference``
    The frozen reference model and its data: the embedded default (``embedded``, ``digits``,
    ``classifier``, ``tokenizer``) and ``loader``, which loads it or any Stable Diffusion checkpoint.
``training.step``
    The maths of one reverse step: the Gaussian kernel (``kernel``), the chain runner (``chain``), the
    step policy (``policy``), the step optimum (``optimum``) and the kernel check watched while training
    (``kernel_check``).
The base model (this folder)
    ``trainer`` (losses and updates), ``checkpoints`` (its record and resumable checkpoints),
    ``distributed`` (the accelerator, rank 0's weights, gradients averaged across processes), ``sd_problem``
    (the trainer's problem on a Stable Diffusion UNet), ``rewards``, ``images`` (tensors to pixels),
    ``base_model`` (one base model end to end), ``card`` (its saved description), ``device``, and
    ``storage`` (the home folder, content hashes, atomic writes).
``training.analysis``
    Used only by the benchmarks and tests: the analytic 2-D ``toy``, ``sampling`` (decoded images of a
    policy) and the ``ddpo_baseline``.
"""
