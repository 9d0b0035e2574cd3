"""The one argparse parser (Megatron / EE-LLM flag names) and its translation into configs.

    args = parse_args(["--num-layers", "4", ...])      # + check_args(args): ignored flags
    args = with_checkpoint_args(args, meta)            # --use-checkpoint-args (a new Namespace)
    configs = configs_from_args(args, world_size=4, vocab_size=tokenizer_vocab)

Only this module and entry scripts touch argparse; the rest of the code takes dataclass configs
(config.py), which validate themselves with messages naming these flags. ``check_args`` refuses
flags that would be silently ignored (e.g. ``--use-exit-norm`` without ``--exit-layer-nums``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional

from megatron.early_exit.cli import UsageError, check_requires

from megatron.early_exit.config import (ConfigError, EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig,
                                        RunConfig, ScheduleConfig, TrainConfig)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, help="Hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, help="MLP hidden size (default 4 x hidden).")
    g.add_argument("--num-attention-heads", type=int, help="Attention heads.")
    g.add_argument("--num-query-groups", type=int, help="Key/value heads for GQA (default: heads).")
    g.add_argument("--seq-length", type=int, help="Training sequence length.")
    g.add_argument("--max-position-embeddings", type=int, help="Max positions (default: seq length).")
    g.add_argument("--architecture", choices=["llama", "gpt2"], default="llama",
                   help="Preset: llama (RMSNorm, SwiGLU, RoPE, no bias, untied) or gpt2.")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], help="Override the norm.")
    g.add_argument("--swiglu", action="store_true", default=None, help="Use SwiGLU in the MLP.")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"],
                   help="Override the position embedding.")
    g.add_argument("--disable-bias-linear", action="store_true", help="No biases in linear layers.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="Separate output layer weight (llama preset does this).")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base.")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Norm epsilon.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Init std of weights.")


def _exit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early exit")
    g.add_argument("--exit-layer-nums", type=int, nargs="*", default=[],
                   help="1-based layers after which exits are attached.")
    g.add_argument("--pre-exit", action="store_true", help="Exits read a layer's input, not output.")
    g.add_argument("--use-exit-norm", action="store_true", help="Norm in every exit head.")
    g.add_argument("--use-exit-mlp", action="store_true", help="Residual MLP in every exit head.")
    g.add_argument("--use-exit-block", action="store_true",
                   help="A whole transformer layer in every exit head.")
    g.add_argument("--untie-exit-output-weights", action="store_true",
                   help="Exit output projections not tied to the word embedding.")
    g.add_argument("--use-exit-classifier", action="store_true",
                   help="Every exit carries a confidence classifier (fitted afterwards by "
                        "tools/fit_exit_classifier.py; frozen in training).")
    g.add_argument("--exit-layer-temperature", type=float, nargs="*", default=[],
                   help="Logit temperature per exit in the loss (one value or one per exit).")
    g.add_argument("--exit-layer-weight", type=float, nargs="*", default=[],
                   help="Target loss weight per exit (one value or one per exit).")
    g.add_argument("--exit-layer-weight-init", type=float, nargs="*", default=[],
                   help="Initial loss weight per exit (default: the target).")
    g.add_argument("--exit-layer-weight-warmup-iters", type=int, default=0,
                   help="Iterations to move exit weights from init to target.")
    g.add_argument("--exit-layer-weight-warmup-style", choices=["linear", "cosine"], default="linear",
                   help="Shape of the exit-weight schedule.")
    g.add_argument("--use-dynamic-exit-layer-weight", action="store_true",
                   help="Scale each token's exit loss by the exit's detached max probability.")
    g.add_argument("--final-layer-weight", type=float, default=1.0, help="Weight of the final LM loss.")


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism and pipeline schedule")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP degree.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP degree.")
    g.add_argument("--sequence-parallel", action="store_true", help="Sequence parallelism (TP>1).")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="Layers per virtual stage (interleaved 1F1B).")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="Activation recomputation (full: per layer; selective: core attention).")
    g.add_argument("--cross-entropy-chunk-size", type=int, default=4096,
                   help="Tokens per chunk of every head's output projection fused with its cross "
                        "entropy (no [s, b, V/tp] logits kept for backward); 0: materialised logits.")
    g.add_argument("--fill-explicit-bubbles", action="store_true",
                   help="Fill pipeline bubbles with partial micro-batches' exit losses.")
    g.add_argument("--num-fill-warmup-microbatches", type=int, help="Partial micro-batches in warm-up.")
    g.add_argument("--num-fill-cooldown-microbatches", type=int, help="Partial micro-batches in cool-down.")
    g.add_argument("--backward-forward-ratio", type=float, default=2.0,
                   help="Backward / forward time, sizes the bubbles.")
    g.add_argument("--tune-exit", action="store_true", help="Freeze the backbone, train only exits.")
    g.add_argument("--tune-exit-pipeline-parallel-size", type=int,
                   help="With --tune-exit: load and run only the first K of the "
                        "--pipeline-model-parallel-size stages (TP x K x DP ranks); checkpoints "
                        "are saved whole (the untouched layers come from --load).")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="Sequences per micro-batch.")
    g.add_argument("--global-batch-size", type=int, default=16, help="Sequences per step.")
    g.add_argument("--train-iters", type=int, default=100, help="Training iterations.")
    g.add_argument("--lr", type=float, default=3e-4, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Final learning rate.")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine",
                   help="LR decay after warm-up.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear LR warm-up iterations.")
    g.add_argument("--lr-decay-iters", type=int, help="Decay horizon (default: --train-iters).")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Global grad-norm clip (0: off).")
    g.add_argument("--seed", type=int, default=1234, help="Seed of init, data order and dropout.")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU (fp32 master weights).")
    g.add_argument("--optimizer-backend", choices=["auto", "megatron", "torch"], default="auto",
                   help="AdamW implementation: megatron-core's optimizer with DDP grad buffers "
                        "(GPU only), or torch AdamW with our all-reduces; auto = megatron on CUDA, "
                        "torch on CPU.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard the optimizer state over data-parallel ranks (megatron-core's "
                        "DistributedOptimizer; GPU only).")
    g.add_argument("--fp64", action="store_true", help="float64 parameters (tests, CPU only).")
    g.add_argument("--log-interval", type=int, default=10, help="Iterations between log lines.")
    g.add_argument("--eval-interval", type=int, default=0, help="Iterations between evaluations.")
    g.add_argument("--eval-iters", type=int, default=10, help="Batches per evaluation.")


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data, tokenizer, checkpoints, logging")
    g.add_argument("--data-path", nargs="*", default=[],
                   help="Indexed dataset prefixes, optionally weighted: [W1] P1 [W2] P2 ...")
    g.add_argument("--split", default="969,30,1", help="Train,valid,test weights.")
    g.add_argument("--data-cache-path", help="Where dataset index caches are written.")
    g.add_argument("--tokenizer-type", default="ByteTokenizer",
                   choices=["ByteTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer",
                            "SentencePieceTokenizer"], help="Tokenizer kind.")
    g.add_argument("--tokenizer-model", help="tokenizer.json or SentencePiece .model file.")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json.")
    g.add_argument("--merge-file", help="GPT-2 merges.txt.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this x TP.")
    g.add_argument("--save", help="Checkpoint directory to write.")
    g.add_argument("--load", help="Checkpoint directory to resume from.")
    g.add_argument("--load-iteration", type=int, help="Iteration to load (default: latest).")
    g.add_argument("--save-interval", type=int, default=0, help="Iterations between checkpoints.")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="Take model arguments from the checkpoint in --load.")
    g.add_argument("--tensorboard-dir", help="Write TensorBoard scalars here.")
    g.add_argument("--log-json", help="Append one JSON object per logged iteration to this file.")
    g.add_argument("--peak-tflops", type=float,
                   help="Peak TFLOP/s of one device, to log model FLOPs utilisation (mfu).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain an early-exit GPT on megatron-core.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (_model_args, _exit_args, _parallel_args, _training_args, _run_args):
        add(p)
    p.add_argument("--debug", action="store_true",
                   help="Show the traceback of input errors too (cli.run_cli reads it).")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# flags that do nothing without their partner (argparse dests)
_EXIT_FLAGS = ("pre_exit", "use_exit_norm", "use_exit_mlp", "use_exit_block", "untie_exit_output_weights",
               "use_exit_classifier",
               "exit_layer_temperature", "exit_layer_weight", "exit_layer_weight_init",
               "use_dynamic_exit_layer_weight")
REQUIRES = ([(flag, "exit_layer_nums") for flag in _EXIT_FLAGS]
            + [("num_fill_warmup_microbatches", "fill_explicit_bubbles"),
               ("num_fill_cooldown_microbatches", "fill_explicit_bubbles"),
               ("load_iteration", "load"), ("use_checkpoint_args", "load")])


def check_args(a: argparse.Namespace) -> None:
    """Refuse flags that this run would silently ignore (UsageError naming the flag)."""
    check_requires(a, REQUIRES)
    if a.exit_layer_weight_warmup_iters and not a.exit_layer_nums:
        raise UsageError("--exit-layer-weight-warmup-iters", "has no effect without --exit-layer-nums")
    if a.lr_decay_iters is not None and a.lr_decay_style == "constant":
        raise UsageError("--lr-decay-iters", "has no effect with --lr-decay-style constant")
    if a.fill_explicit_bubbles and a.pipeline_model_parallel_size == 1:
        raise UsageError("--fill-explicit-bubbles", "fills pipeline bubbles, so it needs "
                         "--pipeline-model-parallel-size > 1")


# checkpoint config field -> argparse dest, for --use-checkpoint-args
_MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "seq_length", "max_position_embeddings", "architecture", "normalization", "swiglu",
                 "position_embedding_type", "untie_embeddings_and_output_weights", "rotary_base",
                 "norm_epsilon")
_EXIT_FIELDS = ("exit_layer_nums", "pre_exit", "use_exit_norm", "use_exit_mlp", "use_exit_block",
                "untie_exit_output_weights", "use_exit_classifier")
_RUN_FIELDS = ("tokenizer_type", "make_vocab_size_divisible_by")


def with_checkpoint_args(a: argparse.Namespace, meta: dict) -> argparse.Namespace:
    """--use-checkpoint-args: a copy of ``a`` whose model-defining flags (shape, architecture,
    exit structure, tokenizer type) are the checkpoint's saved config (``meta`` from
    checkpoint.load.read_checkpoint_metadata); the other flags stay as given."""
    model, exits = meta["config"]["model"], meta["config"].get("exits", {})
    values = {f: model[f] for f in _MODEL_FIELDS if f in model}
    values.update({f: exits[f] for f in _EXIT_FIELDS if f in exits})
    run = meta.get("args") or {}  # the saving run's RunConfig
    values.update({f: run[f] for f in _RUN_FIELDS if f in run})
    if a.seq_length is not None:  # a given --seq-length is the run's training length: it wins
        values.pop("seq_length", None)
    if "add_bias_linear" in model:
        values["disable_bias_linear"] = not model["add_bias_linear"]
    if model.get("init_num_layers"):
        values["num_layers"] = model["init_num_layers"]
    return argparse.Namespace(**{**vars(a), **values})


@dataclass
class Configs:
    model: EarlyExitGPTConfig
    train: TrainConfig
    run: RunConfig
    schedule: ScheduleConfig


def tuning_truncation(a: argparse.Namespace) -> tuple:
    """(layers, pipeline stages) this run builds. With ``--tune-exit-pipeline-parallel-size K``
    it runs only the first K of the --pipeline-model-parallel-size P stages: the model is cut
    after their layers (every exit must lie there) and the world holds TP x K x DP ranks."""
    k, p, layers = a.tune_exit_pipeline_parallel_size, a.pipeline_model_parallel_size, a.num_layers
    if k is None:
        return layers, p
    if not a.tune_exit:
        raise ConfigError("--tune-exit-pipeline-parallel-size needs --tune-exit")
    if not 1 <= k <= p:
        raise ConfigError(f"--tune-exit-pipeline-parallel-size must be in [1, "
                          f"--pipeline-model-parallel-size={p}], got {k}")
    if layers % p:
        raise ConfigError(f"--num-layers ({layers}) must be divisible by "
                          f"--pipeline-model-parallel-size ({p})")
    if a.num_layers_per_virtual_pipeline_stage is not None:
        raise ConfigError("--tune-exit-pipeline-parallel-size cannot be combined with "
                          "--num-layers-per-virtual-pipeline-stage")
    kept = layers // p * k
    beyond = [x for x in (a.exit_layer_nums or []) if x > kept]
    if beyond:
        raise ConfigError(f"--tune-exit-pipeline-parallel-size {k} keeps layers 1..{kept} of {layers}; "
                          f"--exit-layer-nums {beyond} lie beyond them")
    return kept, k


def run_config_from_args(a: argparse.Namespace) -> RunConfig:
    return RunConfig(
        data_path=a.data_path, split=a.split, tokenizer_type=a.tokenizer_type,
        tokenizer_model=a.tokenizer_model, vocab_file=a.vocab_file, merge_file=a.merge_file,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, save=a.save, load=a.load,
        load_iteration=a.load_iteration, save_interval=a.save_interval,
        use_checkpoint_args=a.use_checkpoint_args, tensorboard_dir=a.tensorboard_dir,
        log_json=a.log_json, data_cache_path=a.data_cache_path)


def configs_from_args(a: argparse.Namespace, world_size: int, vocab_size: int,
                      tokenizer_vocab_size: Optional[int] = None) -> Configs:
    """Translate parsed flags into validated configs; ``vocab_size`` is already padded
    (``tokenizer_vocab_size``: the tokenizer's own size, ModelConfig.tokenizer_vocab_size)."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(a, flag) is None:
            raise ConfigError(f"--{flag.replace('_', '-')} is required (or --use-checkpoint-args with --load)")
    num_layers, pp = tuning_truncation(a)
    model = ModelConfig(
        num_layers=num_layers, init_num_layers=a.num_layers if num_layers != a.num_layers else None,
        hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        vocab_size=vocab_size, ffn_hidden_size=a.ffn_hidden_size, num_query_groups=a.num_query_groups,
        seq_length=a.seq_length, max_position_embeddings=a.max_position_embeddings,
        architecture=a.architecture, normalization=a.normalization, swiglu=a.swiglu,
        position_embedding_type=a.position_embedding_type,
        add_bias_linear=False if a.disable_bias_linear else None,
        untie_embeddings_and_output_weights=a.untie_embeddings_and_output_weights,
        rotary_base=a.rotary_base, norm_epsilon=a.norm_epsilon, init_method_std=a.init_method_std,
        tokenizer_vocab_size=tokenizer_vocab_size)
    exits = ExitConfig(
        exit_layer_nums=a.exit_layer_nums, pre_exit=a.pre_exit, use_exit_norm=a.use_exit_norm,
        use_exit_mlp=a.use_exit_mlp, use_exit_block=a.use_exit_block,
        untie_exit_output_weights=a.untie_exit_output_weights,
        use_exit_classifier=a.use_exit_classifier,
        exit_layer_temperature=a.exit_layer_temperature, exit_layer_weight=a.exit_layer_weight,
        exit_layer_weight_init=a.exit_layer_weight_init,
        exit_layer_weight_warmup_iters=a.exit_layer_weight_warmup_iters,
        exit_layer_weight_warmup_style=a.exit_layer_weight_warmup_style,
        use_dynamic_exit_layer_weight=a.use_dynamic_exit_layer_weight,
        final_layer_weight=a.final_layer_weight)
    parallel = ParallelConfig(
        tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        sequence_parallel=a.sequence_parallel,
        num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage,
        world_size=world_size)
    dtype = "float64" if a.fp64 else "float32"
    cfg = EarlyExitGPTConfig(model=model, exits=exits, parallel=parallel,
                             recompute_granularity=a.recompute_granularity, params_dtype=dtype,
                             seed=a.seed, cross_entropy_chunk_size=a.cross_entropy_chunk_size)
    train = TrainConfig(
        micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
        train_iters=a.train_iters, lr=a.lr, min_lr=a.min_lr, lr_decay_style=a.lr_decay_style,
        lr_warmup_iters=a.lr_warmup_iters, lr_decay_iters=a.lr_decay_iters,
        weight_decay=a.weight_decay, adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2,
        adam_eps=a.adam_eps, clip_grad=a.clip_grad, bf16=a.bf16, log_interval=a.log_interval,
        optimizer_backend=a.optimizer_backend, use_distributed_optimizer=a.use_distributed_optimizer,
        eval_interval=a.eval_interval, eval_iters=a.eval_iters)
    train.num_microbatches(parallel.data_parallel_size)  # validates the batch arithmetic
    run = run_config_from_args(a)
    schedule = ScheduleConfig(
        fill_explicit_bubbles=a.fill_explicit_bubbles,
        num_fill_warmup_microbatches=a.num_fill_warmup_microbatches,
        num_fill_cooldown_microbatches=a.num_fill_cooldown_microbatches,
        backward_forward_ratio=a.backward_forward_ratio, tune_exit=a.tune_exit,
        tune_exit_pipeline_parallel_size=a.tune_exit_pipeline_parallel_size)
    return Configs(cfg, train, run, schedule)
