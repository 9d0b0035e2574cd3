"""Dataclass configs for early-exit GPT models, exits and parallelism.

Every field mirrors a Megatron / EE-LLM command-line flag (named in the error messages), and
every config validates itself in ``__post_init__`` so a bad value fails at start with a message
naming the flag. ``arguments.py`` is the only place that turns argparse flags into these.

    >>> cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256)
    >>> ExitConfig(exit_layer_nums=[1, 2]).validate_against(cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

ARCHITECTURES = ("llama", "gpt2")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the command-line flag."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Backbone shape and architecture options (Llama- or GPT-2-style)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    # 'llama' = RMSNorm, SwiGLU, RoPE, no biases, untied output; 'gpt2' = LayerNorm, GELU,
    # learned positions, biases, tied output. Individual fields below override the preset.
    architecture: str = "llama"
    normalization: Optional[str] = None  # --normalization {LayerNorm,RMSNorm}
    swiglu: Optional[bool] = None  # --swiglu
    position_embedding_type: Optional[str] = None  # --position-embedding-type
    add_bias_linear: Optional[bool] = None  # --disable-bias-linear turns it off
    add_qkv_bias: bool = False  # --add-qkv-bias: bias on the QKV projection only (Qwen2)
    untie_embeddings_and_output_weights: Optional[bool] = None
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # depth used by the init's output-projection scaling (a truncated exit-tuning run uses the
    # full model's, so its fresh exits start as they would in the full model); None: num_layers
    init_num_layers: Optional[int] = None
    # the tokenizer's own vocabulary (ids [0, tokenizer_vocab_size) are tokens); vocab_size above
    # is the padded size of the embedding / output layers. None: no padding (all ids are tokens)
    tokenizer_vocab_size: Optional[int] = None

    def __post_init__(self):
        _require(self.architecture in ARCHITECTURES,
                 f"--architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        llama = self.architecture == "llama"
        if self.normalization is None:
            self.normalization = "RMSNorm" if llama else "LayerNorm"
        if self.swiglu is None:
            self.swiglu = llama
        if self.position_embedding_type is None:
            self.position_embedding_type = "rope" if llama else "learned_absolute"
        if self.add_bias_linear is None:
            self.add_bias_linear = not llama
        if self.untie_embeddings_and_output_weights is None:
            self.untie_embeddings_and_output_weights = llama
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        self._validate()

    def _validate(self) -> None:
        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--num-attention-heads", self.num_attention_heads),
                            ("--ffn-hidden-size", self.ffn_hidden_size),
                            ("--num-query-groups", self.num_query_groups),
                            ("--seq-length", self.seq_length), ("vocab size", self.vocab_size)):
            _require(isinstance(value, int) and value > 0, f"{flag} must be a positive integer, got {value!r}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                 f"({self.num_attention_heads})")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                 f"--num-query-groups ({self.num_query_groups})")
        _require(self.normalization in ("LayerNorm", "RMSNorm"),
                 f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        _require(self.position_embedding_type in ("rope", "learned_absolute"),
                 "--position-embedding-type must be rope or learned_absolute, got "
                 f"{self.position_embedding_type!r}")
        _require(self.max_position_embeddings >= self.seq_length,
                 f"--max-position-embeddings ({self.max_position_embeddings}) must be >= "
                 f"--seq-length ({self.seq_length})")
        if self.position_embedding_type == "rope":
            _require(self.head_dim % 2 == 0, f"rope needs an even head dim, got {self.head_dim}")
        _require(self.init_method_std > 0, "--init-method-std must be positive")
        if self.tokenizer_vocab_size is not None:
            _require(isinstance(self.tokenizer_vocab_size, int)
                     and 0 < self.tokenizer_vocab_size <= self.vocab_size,
                     f"tokenizer vocabulary size {self.tokenizer_vocab_size!r} must be in "
                     f"[1, padded vocab size {self.vocab_size}]")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_tokens(self) -> int:
        """Ids that are real tokens: the tokenizer's vocabulary (padded columns excluded)."""
        return self.vocab_size if self.tokenizer_vocab_size is None else self.tokenizer_vocab_size


@dataclass
class ExitConfig:
    """Where the exits are, what each exit head is made of, and how exit losses are weighted."""

    exit_layer_nums: List[int] = field(default_factory=list)  # --exit-layer-nums (1-based)
    pre_exit: bool = False  # --pre-exit: read layer k's input instead of its output
    use_exit_norm: bool = False  # --use-exit-norm
    use_exit_mlp: bool = False  # --use-exit-mlp
    use_exit_block: bool = False  # --use-exit-block
    untie_exit_output_weights: bool = False  # --untie-exit-output-weights
    # --use-exit-classifier: each exit carries a confidence classifier (a logistic regression on
    # the head's hidden state, fitted by tools/fit_exit_classifier.py; never trained here)
    use_exit_classifier: bool = False
    exit_layer_temperature: List[float] = field(default_factory=list)  # one or one per exit
    exit_layer_weight: List[float] = field(default_factory=list)  # target weight per exit
    exit_layer_weight_init: List[float] = field(default_factory=list)  # start weight per exit
    exit_layer_weight_warmup_iters: int = 0
    exit_layer_weight_warmup_style: str = "linear"  # {linear, cosine}
    use_dynamic_exit_layer_weight: bool = False
    final_layer_weight: float = 1.0  # weight of the final head's LM loss

    def __post_init__(self):
        self.exit_layer_nums = [int(x) for x in self.exit_layer_nums]
        n = len(self.exit_layer_nums)
        _require(len(set(self.exit_layer_nums)) == n,
                 f"--exit-layer-nums has a repeated layer: {self.exit_layer_nums}")
        _require(self.exit_layer_nums == sorted(self.exit_layer_nums),
                 f"--exit-layer-nums must be increasing, got {self.exit_layer_nums}")
        self.exit_layer_weight = self._per_exit("--exit-layer-weight", self.exit_layer_weight, 1.0)
        self.exit_layer_weight_init = self._per_exit(
            "--exit-layer-weight-init", self.exit_layer_weight_init, None) or list(self.exit_layer_weight)
        self.exit_layer_temperature = self._per_exit(
            "--exit-layer-temperature", self.exit_layer_temperature, 1.0)
        _require(all(t > 0 for t in self.exit_layer_temperature),
                 f"--exit-layer-temperature must be positive, got {self.exit_layer_temperature}")
        _require(all(w >= 0 for w in self.exit_layer_weight + self.exit_layer_weight_init),
                 "--exit-layer-weight and --exit-layer-weight-init must be >= 0")
        _require(self.exit_layer_weight_warmup_iters >= 0,
                 "--exit-layer-weight-warmup-iters must be >= 0")
        _require(self.exit_layer_weight_warmup_style in ("linear", "cosine"),
                 "--exit-layer-weight-warmup-style must be linear or cosine, got "
                 f"{self.exit_layer_weight_warmup_style!r}")
        _require(self.final_layer_weight >= 0, "--final-layer-weight must be >= 0")

    def _per_exit(self, flag: str, values: List[float], default: Optional[float]) -> List[float]:
        n = len(self.exit_layer_nums)
        values = [float(v) for v in values]
        if not values:
            return [] if default is None else [default] * n
        if len(values) == 1 and n > 1:
            return values * n
        _require(len(values) == n,
                 f"{flag} has {len(values)} values but --exit-layer-nums names {n} exits "
                 f"({self.exit_layer_nums}); give one value or one per exit")
        return values

    def validate_against(self, model: ModelConfig) -> None:
        for layer in self.exit_layer_nums:
            _require(1 <= layer <= model.num_layers,
                     f"--exit-layer-nums: layer {layer} is outside [1, --num-layers={model.num_layers}]")

    def weights_at(self, iteration: int) -> List[float]:
        """Exit-loss weights w_i(t) at training iteration ``iteration`` (0-based)."""
        warmup = self.exit_layer_weight_warmup_iters
        progress = 1.0 if warmup == 0 else min(max(iteration, 0) / warmup, 1.0)
        if self.exit_layer_weight_warmup_style == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return [w0 + (w1 - w0) * progress
                for w0, w1 in zip(self.exit_layer_weight_init, self.exit_layer_weight)]


@dataclass
class ParallelConfig:
    """Tensor / sequence / pipeline / data parallel degrees (data parallel is derived)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    world_size: int = 1

    def __post_init__(self):
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(tp >= 1, f"--tensor-model-parallel-size must be >= 1, got {tp}")
        _require(pp >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp}")
        _require(self.world_size % (tp * pp) == 0,
                 f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                 f"({tp}) x --pipeline-model-parallel-size ({pp})")
        _require(not (self.sequence_parallel and tp == 1),
                 "--sequence-parallel needs --tensor-model-parallel-size > 1")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def validate_against(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(model.num_attention_heads % tp == 0,
                 f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
                 f"--tensor-model-parallel-size ({tp})")
        _require(model.num_query_groups % tp == 0,
                 f"--num-query-groups ({model.num_query_groups}) must be divisible by "
                 f"--tensor-model-parallel-size ({tp})")
        _require(model.ffn_hidden_size % tp == 0,
                 f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by "
                 f"--tensor-model-parallel-size ({tp})")
        _require(model.vocab_size % tp == 0,
                 f"vocab size {model.vocab_size} must be divisible by --tensor-model-parallel-size "
                 f"({tp}); pad it with --make-vocab-size-divisible-by")
        _require(model.num_layers % pp == 0,
                 f"--num-layers ({model.num_layers}) must be divisible by "
                 f"--pipeline-model-parallel-size ({pp})")
        vpp = self.num_layers_per_virtual_pipeline_stage
        if vpp is not None:
            _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                             "--pipeline-model-parallel-size > 1")
            _require(vpp >= 1 and (model.num_layers // pp) % vpp == 0,
                     f"--num-layers-per-virtual-pipeline-stage ({vpp}) must divide the layers per "
                     f"pipeline stage ({model.num_layers // pp})")

    def virtual_chunks(self, model: ModelConfig) -> int:
        vpp = self.num_layers_per_virtual_pipeline_stage
        if vpp is None:
            return 1
        return model.num_layers // self.pipeline_model_parallel_size // vpp


@dataclass
class EarlyExitGPTConfig:
    """Everything needed to build the model on one rank: backbone, exits, parallel layout."""

    model: ModelConfig
    exits: ExitConfig = field(default_factory=ExitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute_granularity: Optional[str] = None  # --recompute-granularity {full,selective}
    params_dtype: str = "float32"  # float32 | float64 | bfloat16 (--bf16)
    seed: int = 1234  # --seed
    # tokens per chunk of the fused output-projection + cross-entropy of every head (no
    # [s, b, V/tp] logits kept for backward); 0: materialised logits
    cross_entropy_chunk_size: int = 4096  # --cross-entropy-chunk-size

    def __post_init__(self):
        self.exits.validate_against(self.model)
        self.parallel.validate_against(self.model)
        _require(isinstance(self.cross_entropy_chunk_size, int) and self.cross_entropy_chunk_size >= 0,
                 "--cross-entropy-chunk-size must be a non-negative integer (0: materialised "
                 f"logits), got {self.cross_entropy_chunk_size!r}")
        _require(self.recompute_granularity in (None, "full", "selective"),
                 f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        _require(self.params_dtype in ("float32", "float64", "bfloat16"),
                 f"params dtype must be float32, float64 or bfloat16 (--bf16), got {self.params_dtype!r}")


@dataclass
class TrainConfig:
    """Optimisation, batch and loop settings (Megatron flag names)."""

    micro_batch_size: int = 4  # --micro-batch-size
    global_batch_size: int = 16  # --global-batch-size
    train_iters: int = 100  # --train-iters
    lr: float = 3e-4  # --lr
    min_lr: float = 0.0  # --min-lr
    lr_decay_style: str = "cosine"  # --lr-decay-style {constant,linear,cosine}
    lr_warmup_iters: int = 0  # --lr-warmup-iters
    lr_decay_iters: Optional[int] = None  # --lr-decay-iters (default: --train-iters)
    weight_decay: float = 0.01  # --weight-decay
    adam_beta1: float = 0.9  # --adam-beta1
    adam_beta2: float = 0.95  # --adam-beta2
    adam_eps: float = 1e-8  # --adam-eps
    clip_grad: float = 1.0  # --clip-grad (0 disables)
    bf16: bool = False  # --bf16 (autocast on CUDA; fp32 master weights)
    optimizer_backend: str = "auto"  # --optimizer-backend {auto,megatron,torch}
    use_distributed_optimizer: bool = False  # --use-distributed-optimizer (megatron backend)
    log_interval: int = 10  # --log-interval
    eval_interval: int = 0  # --eval-interval (0: never)
    eval_iters: int = 10  # --eval-iters

    def __post_init__(self):
        for flag, value in (("--micro-batch-size", self.micro_batch_size),
                            ("--global-batch-size", self.global_batch_size),
                            ("--train-iters", self.train_iters), ("--log-interval", self.log_interval)):
            _require(value > 0, f"{flag} must be positive, got {value}")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr,
                 f"--lr must be positive and --min-lr in [0, --lr]; got {self.lr}, {self.min_lr}")
        _require(self.lr_decay_style in ("constant", "linear", "cosine"),
                 f"--lr-decay-style must be constant, linear or cosine, got {self.lr_decay_style!r}")
        _require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0")
        _require(self.optimizer_backend in ("auto", "megatron", "torch"),
                 f"--optimizer-backend must be auto, megatron or torch, got {self.optimizer_backend!r}")
        _require(not (self.use_distributed_optimizer and self.optimizer_backend == "torch"),
                 "--use-distributed-optimizer is megatron-core's optimizer: it cannot be combined "
                 "with --optimizer-backend torch")
        _require(self.eval_interval >= 0 and self.eval_iters >= 0,
                 "--eval-interval and --eval-iters must be >= 0")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters

    def resolved_optimizer_backend(self, device: "torch.device") -> str:
        """'megatron' or 'torch': auto picks megatron-core's optimizer on CUDA, torch AdamW on
        CPU (megatron-core's optimizer wrappers allocate on the GPU)."""
        if self.optimizer_backend != "auto":
            return self.optimizer_backend
        return "megatron" if device.type == "cuda" else "torch"

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        _require(self.global_batch_size % per_step == 0,
                 f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                 f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size ({data_parallel_size})")
        return self.global_batch_size // per_step


@dataclass
class ScheduleConfig:
    """Pipeline schedule options: bubble filling and exit tuning."""

    fill_explicit_bubbles: bool = False  # --fill-explicit-bubbles
    num_fill_warmup_microbatches: Optional[int] = None  # --num-fill-warmup-microbatches (None: max)
    num_fill_cooldown_microbatches: Optional[int] = None  # --num-fill-cooldown-microbatches
    backward_forward_ratio: float = 2.0  # --backward-forward-ratio
    tune_exit: bool = False  # --tune-exit
    tune_exit_pipeline_parallel_size: Optional[int] = None  # --tune-exit-pipeline-parallel-size

    def __post_init__(self):
        _require(self.backward_forward_ratio > 0, "--backward-forward-ratio must be positive")
        for flag, value in (("--num-fill-warmup-microbatches", self.num_fill_warmup_microbatches),
                            ("--num-fill-cooldown-microbatches", self.num_fill_cooldown_microbatches)):
            _require(value is None or value >= 0, f"{flag} must be >= 0, got {value}")
        _require(not (self.fill_explicit_bubbles and self.tune_exit),
                 "--fill-explicit-bubbles and --tune-exit cannot be combined")


@dataclass
class RunConfig:
    """Data, tokenizer, checkpoint and logging settings of a training run."""

    data_path: List[str] = field(default_factory=list)  # --data-path [W1] P1 [W2] P2 ...
    split: str = "969,30,1"  # --split
    tokenizer_type: str = "ByteTokenizer"  # --tokenizer-type
    tokenizer_model: Optional[str] = None  # --tokenizer-model
    vocab_file: Optional[str] = None  # --vocab-file
    merge_file: Optional[str] = None  # --merge-file
    make_vocab_size_divisible_by: int = 128  # --make-vocab-size-divisible-by
    save: Optional[str] = None  # --save
    load: Optional[str] = None  # --load
    load_iteration: Optional[int] = None  # --load-iteration
    save_interval: int = 0  # --save-interval
    use_checkpoint_args: bool = False  # --use-checkpoint-args
    tensorboard_dir: Optional[str] = None  # --tensorboard-dir
    log_json: Optional[str] = None  # --log-json
    data_cache_path: Optional[str] = None  # --data-cache-path

    def __post_init__(self):
        _require(self.save_interval >= 0, "--save-interval must be >= 0")
        _require(not (self.save_interval and not self.save), "--save-interval needs --save")
        _require(self.make_vocab_size_divisible_by > 0, "--make-vocab-size-divisible-by must be positive")
        parts = self.split.replace("/", ",").split(",")
        _require(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
                 f"--split must be three comma-separated weights like 969,30,1; got {self.split!r}")
