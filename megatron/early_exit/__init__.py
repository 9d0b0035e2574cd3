"""megatron.early_exit: early-exit GPT training and inference on megatron-core.

This package is a namespace portion beside pip's ``megatron.core`` (there is deliberately no
``megatron/__init__.py``), so ``import megatron.core, megatron.early_exit`` both work.
"""

__version__ = "0.1.0"
