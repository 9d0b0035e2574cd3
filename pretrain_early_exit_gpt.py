"""Pretrain an early-exit GPT on megatron-core (see README, `--help` for every flag).

    torchrun --nproc-per-node N pretrain_early_exit_gpt.py [Megatron-style flags]
    python pretrain_early_exit_gpt.py [flags] [--debug]

Flags -> configs (megatron/early_exit/arguments.py) -> trainer/pretrain.py's ``pretrain``. A bad
flag, config or checkpoint ends with one line ``error: --flag: what is wrong`` and exit code 2
(megatron/early_exit/cli.py); ``--debug`` shows the traceback.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402


def checkpoint_args(args):
    """--use-checkpoint-args: the model-defining flags from the checkpoint in --load."""
    from megatron.early_exit.arguments import with_checkpoint_args
    from megatron.early_exit.checkpoint.format import CheckpointError
    from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

    if not args.load:
        raise UsageError("--use-checkpoint-args", "needs --load")
    try:
        return with_checkpoint_args(args, read_checkpoint_metadata(args.load, args.load_iteration))
    except CheckpointError as e:
        raise blame("--load", e) from e


def check_load(args) -> None:
    """A --load directory that does not exist is a typo, unless it is also --save (the resume
    idiom: the first run starts from scratch, trainer/pretrain.py says so)."""
    if args.load and not os.path.exists(args.load):
        if not (args.save and os.path.abspath(args.load) == os.path.abspath(args.save)):
            raise UsageError("--load", f"{args.load} does not exist (to start from scratch, drop "
                                       "--load or give it the --save directory)")


def tokenizer_and_vocab(args):
    """The tokenizer of --tokenizer-type and the padded vocabulary (with --use-checkpoint-args
    the checkpoint's, whatever the new TP: its rows must match)."""
    from megatron.early_exit.data.tokenizers import build_tokenizer, pad_vocab_size

    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                tokenizer_model=args.tokenizer_model)
    if args.use_checkpoint_args:
        from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

        vocab = read_checkpoint_metadata(args.load, args.load_iteration)["config"]["model"]["vocab_size"]
    else:
        vocab = pad_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                               args.tensor_model_parallel_size)
    return tokenizer, vocab


def main(argv=None) -> dict:
    """Flags -> validated configs (before torch.distributed starts) -> pretrain()."""
    from megatron.early_exit.arguments import check_args, configs_from_args, parse_args

    args = parse_args(argv)
    if args.use_checkpoint_args:
        args = checkpoint_args(args)
    check_args(args)
    check_load(args)
    tokenizer, vocab = tokenizer_and_vocab(args)
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1  # torchrun's
    configs = configs_from_args(args, world, vocab, tokenizer_vocab_size=tokenizer.vocab_size)

    import torch.distributed as dist

    from megatron.early_exit.trainer.pretrain import init_distributed, pretrain

    device = init_distributed()
    try:
        return pretrain(configs, tokenizer, device, peak_tflops=args.peak_tflops)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
