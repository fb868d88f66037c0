"""The frozen reference model and its data.

``embedded``
    The embedded default: a tiny Stable-Diffusion-format model pretrained here, cached by its config's key.
``digits``
    The shipped data: scikit-learn's 8x8 digits with prompts that name the digit.
``classifier``
    The digit classifier: the embedded model's quality check and the ``digit_alignment`` reward.
``tokenizer``
    The CLIP BPE tokenizer built from the prompt words.
``loader``
    Loading the reference for a config: the embedded default or any diffusers checkpoint.
"""
