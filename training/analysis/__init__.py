"""Analysis code used only by the benchmarks and tests, never by ``msdda`` itself.

``toy``
    An analytic 2-D Gaussian-mixture problem with the exact reference epsilon, for the trainer's tests.
``sampling``
    Decoded images of a diffusion step problem's policy or reference, for the benchmarks that score them.
``ddpo_baseline``
    trl 0.23.1's DDPO trainer on our pipeline, the sample-efficiency baseline.
"""
