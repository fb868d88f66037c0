"""Analysis code used only by the benchmarks and tests, never by ``msdda`` itself.

``toy``
    An analytic 2-D Gaussian-mixture problem with the exact reference epsilon, for the trainer's tests.
``ddpo_baseline``
    trl 0.23.1's DDPO trainer on our pipeline, the sample-efficiency baseline.
"""
