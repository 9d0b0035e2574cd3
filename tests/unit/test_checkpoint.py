"""Checkpoint save/load on one rank: exact round trip, refusal of broken checkpoints, config checks.

The round trip must restore parameters, AdamW state and every RNG bit for bit, so the next
training step equals the one the saving run takes. Broken checkpoints (truncated, flipped byte,
missing file, only a ``.tmp-`` directory, a ``latest`` pointing nowhere, edited metadata) and
mismatching configs must be refused with a ``CheckpointError`` naming the problem.
"""

import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron.early_exit.checkpoint import (CheckpointError, checkpoint_tokenizer_files,
                                            config_from_dict, load_checkpoint, load_full_state,
                                            read_checkpoint_metadata)
from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, TrainConfig


def make_setup(seed=5, hidden=32, exits=(1, 2)):
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.loop import TrainingSetup
    from megatron.early_exit.trainer.optimizer import build_optimizer

    cfg = EarlyExitGPTConfig(
        model=ModelConfig(num_layers=3, hidden_size=hidden, num_attention_heads=4,
                          ffn_hidden_size=48, vocab_size=64, seq_length=8),
        exits=ExitConfig(exit_layer_nums=list(exits), use_exit_norm=True), seed=seed)
    tc = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=10, lr=1e-2,
                     lr_warmup_iters=2, log_interval=1)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    return TrainingSetup(cfg, tc, ctx, chunks, build_optimizer(chunks, tc.lr, tc.weight_decay))


def train_one(setup):
    from megatron.early_exit.trainer.loop import set_learning_rate
    from megatron.early_exit.trainer.step import train_step

    it = setup.iteration
    gen = torch.Generator().manual_seed(100 + it)
    mbs = [{"tokens": torch.randint(0, 64, (2, 8), generator=gen),
            "labels": torch.randint(0, 64, (2, 8), generator=gen),
            "loss_mask": torch.ones(2, 8)} for _ in range(2)]
    set_learning_rate(setup, it)
    train_step(setup.chunks, setup.optimizer, mbs, setup.ctx, setup.cfg, iteration=it)
    setup.iteration = it + 1


def snapshot(setup):
    params = {n: p.detach().clone() for n, p in setup.chunks[0].named_parameters()}
    state = {n: {k: v.clone() for k, v in setup.optimizer.state[p].items()}
             for n, p in setup.chunks[0].named_parameters()}
    return params, state


def draw_rng():
    return torch.rand(3), random.random(), np.random.rand(2)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def test_round_trip_is_exact(single_rank_parallel, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a b c\n")
    ckpt = str(tmp_path / "ckpt")
    s1 = make_setup(seed=5)
    train_one(s1)
    train_one(s1)
    path = s1.save_checkpoint(ckpt, args={"lr": 1e-2, "load": None}, extra={"consumed_samples": 8},
                           tokenizer_files=[vocab])
    assert path == os.path.join(ckpt, "iter_0000002")
    saved = snapshot(s1)
    rng_after_save = draw_rng()
    train_one(s1)
    reference = snapshot(s1)

    s2 = make_setup(seed=9)  # different weights, fresh optimizer, scrambled RNG
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    meta = s2.load_checkpoint(ckpt)
    assert s2.iteration == 2 and meta["extra"] == {"consumed_samples": 8}
    assert_same(snapshot(s2)[0], saved[0])
    assert_same(snapshot(s2)[1], saved[1])
    got = draw_rng()
    assert torch.equal(got[0], rng_after_save[0]) and got[1] == rng_after_save[1]
    assert np.array_equal(got[2], rng_after_save[2])
    train_one(s2)
    assert_same(snapshot(s2)[0], reference[0])
    assert_same(snapshot(s2)[1], reference[1])

    meta = read_checkpoint_metadata(ckpt)
    assert meta["args"]["lr"] == 1e-2 and config_from_dict(meta["config"]) == s1.cfg
    (tok,) = checkpoint_tokenizer_files(ckpt)
    assert open(tok).read() == "a b c\n" and tok.startswith(path)
    config, full = load_full_state(ckpt)
    assert config["model"]["hidden_size"] == 32
    assert torch.equal(full["decoder.layers.1.mlp.linear_fc1.weight"],
                       saved[0]["decoder.layers.1.mlp.linear_fc1.weight"])

    s2.save_checkpoint(ckpt)  # iteration 3, twice: the second replaces the first
    train_one(s2)
    s2.iteration = 3
    s2.save_checkpoint(ckpt)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000003",
                                        "latest_checkpointed_iteration.txt"]
    s3 = make_setup(seed=9)
    s3.load_checkpoint(ckpt)
    assert_same(snapshot(s3)[0], snapshot(s2)[0])


def _ensure_dist():
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from megatron.early_exit.parallel.state import destroy_parallel

    _ensure_dist()
    setup = make_setup()
    train_one(setup)
    train_one(setup)
    root = str(tmp_path_factory.mktemp("pristine"))
    setup.save_checkpoint(root)
    destroy_parallel()
    return root


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _only_tmp(root):
    os.rename(os.path.join(root, "iter_0000002"), os.path.join(root, "iter_0000002.tmp-dead"))
    os.remove(os.path.join(root, "latest_checkpointed_iteration.txt"))


def _edit_metadata(root):
    path = os.path.join(root, "iter_0000002", "metadata.json")
    text = open(path).read().replace('"iteration": 2', '"iteration": 3')
    open(path, "w").write(text)


MODEL = os.path.join("iter_0000002", "model_tp00_pp000.pt")
CASES = {
    "truncated": (lambda r: _truncate(os.path.join(r, MODEL)),
                  r"model_tp00_pp000.pt has \d+ bytes, the manifest says \d+"),
    "flipped_byte": (lambda r: _flip(os.path.join(r, MODEL)),
                     r"model_tp00_pp000.pt fails its sha256 check"),
    "missing_file": (lambda r: os.remove(os.path.join(r, "iter_0000002", "optim_tp00_pp000.pt")),
                     r"optim_tp00_pp000.pt is missing"),
    "missing_rng": (lambda r: os.remove(os.path.join(r, "iter_0000002", "rng_rank00000.pt")),
                    r"rng_rank00000.pt is missing"),
    "only_tmp_dir": (_only_tmp, r"no latest_checkpointed_iteration.txt in .*incomplete saves "
                                r"\['iter_0000002.tmp-dead'\]"),
    "dangling_latest": (lambda r: open(os.path.join(r, "latest_checkpointed_iteration.txt"),
                                       "w").write("7\n"),
                        r"iteration 7 is not in .*iter_0000007 does not exist"),
    "edited_metadata": (_edit_metadata, r"metadata.json does not match its own sha256 seal"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_is_refused(single_rank_parallel, pristine, tmp_path, case):
    root = str(tmp_path / "ckpt")
    shutil.copytree(pristine, root)
    damage, message = CASES[case]
    damage(root)
    setup = make_setup(seed=9)
    before = snapshot(setup)[0]
    with pytest.raises(CheckpointError, match=message):
        setup.load_checkpoint(root)
    assert_same(snapshot(setup)[0], before)  # refused before any parameter is touched


def test_stray_tmp_dir_keeps_previous_latest(single_rank_parallel, pristine, tmp_path):
    root = str(tmp_path / "ckpt")
    shutil.copytree(pristine, root)
    os.makedirs(os.path.join(root, "iter_0000003.tmp-abc"))  # a save that crashed mid-way
    s = make_setup(seed=9)
    meta = load_checkpoint(root, s.chunks, s.ctx, s.cfg, optimizer=s.optimizer)
    assert meta["iteration"] == 2 and s.iteration == 0  # returned, not set on the caller's object


@pytest.mark.parametrize("change, field", [(dict(hidden=48), "model.hidden_size"),
                                           (dict(exits=(1,)), "exits.exit_layer_nums")])
def test_config_mismatch_names_the_field(single_rank_parallel, pristine, change, field):
    with pytest.raises(CheckpointError, match=rf"{field} is .* in the checkpoint but .* here"):
        make_setup(**change).load_checkpoint(pristine)


def test_non_strict_load_keeps_new_exit(single_rank_parallel, pristine):
    setup = make_setup(seed=9, exits=(1, 2, 3))
    new_exit = setup.chunks[0].exits["3"].norm.weight.detach().clone()
    with pytest.warns(UserWarning, match="exits.3.norm.weight"):
        setup.load_checkpoint(pristine, strict=False, load_optimizer=False)
    _, full = load_full_state(pristine)
    assert torch.equal(setup.chunks[0].embedding.word_embeddings.weight,
                       full["embedding.word_embeddings.weight"])
    assert torch.equal(setup.chunks[0].exits["3"].norm.weight, new_exit)


def test_replace_without_atomic_exchange(single_rank_parallel, tmp_path, monkeypatch):
    """Where renameat2 is unavailable the old copy is moved aside first; a crash between the two
    renames leaves it as iter_XXXXXXX.old-*, which loading falls back to."""
    from megatron.early_exit.checkpoint import format as fmt

    monkeypatch.setattr(fmt, "_exchange", lambda a, b: False)
    root = str(tmp_path / "ckpt")
    setup = make_setup()
    setup.save_checkpoint(root)
    train_one(setup)
    setup.iteration = 0
    setup.save_checkpoint(root)  # replaces iter_0000000
    assert sorted(os.listdir(root)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    os.rename(os.path.join(root, "iter_0000000"), os.path.join(root, "iter_0000000.old-abc"))
    fresh = make_setup(seed=9)
    with pytest.warns(UserWarning, match="moved aside by an interrupted save"):
        fresh.load_checkpoint(root)
    assert_same(snapshot(fresh)[0], snapshot(setup)[0])
