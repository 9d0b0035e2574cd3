"""Pretrain an early-exit GPT on megatron-core (see README, `--help` for every flag).

    torchrun --nproc-per-node N pretrain_early_exit_gpt.py [Megatron-style flags]
"""

from megatron.early_exit.trainer.pretrain import main

if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
