"""trainer sub-package of megatron.early_exit."""
