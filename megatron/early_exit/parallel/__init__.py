"""parallel sub-package of megatron.early_exit."""
