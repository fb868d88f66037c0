"""The maths of one reverse step, shared by training and composition (docs/design.md §1).

``kernel``
    One reverse step as a diagonal Gaussian kernel; the DDIM schedule; where noise is drawn.
``chain``
    The one reverse-chain runner: rollouts, evaluation sampling and every composition method.
``policy``
    The Gaussian step policy: an epsilon model and a learned log-variance offset.
``optimum``
    The step-level optimum (exact for quadratic rewards, Monte Carlo otherwise) and a kernel's distance to it.
``kernel_check``
    The held-out kernel check watched while training.
"""
