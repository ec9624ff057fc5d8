"""divkit inside the trainers people already run.

* :mod:`divkit.integrations.hf`: Hugging Face transformers: a fused cross-entropy forward for
  causal LMs (``apply_divkit_kernel``: the loss from the last hidden states and the lm_head
  weight, no ``[tokens x V]`` logits) and a ``compute_loss_func`` for ``Trainer``.

Importing this package imports nothing heavy; each submodule imports its framework.
"""

__all__ = ["hf"]
