"""Fixtures of the server tests: a tiny trained checkpoint (byte tokenizer, a ChatML chat
template) written once per session, and its engine loaded once per module.

The model (4 layers, exits after 1, 2, 3, hidden 32, 256 positions) is trained for a few dozen
Adam steps on a synthetic language of printable ASCII bytes (tests/unit/engine_testlib.py's
language shifted to bytes 32..127), so its exits are confident on some tokens and not on
others, its text is readable, and it (almost) never emits the end-of-document id.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from tests.unit.engine_testlib import synthetic_batch

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ASCII0, ASCII = 32, 96  # the language's ids 0..95 are bytes 32..127


def tiny_cfg(positions: int = 256) -> EarlyExitGPTConfig:
    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, vocab_size=320, tokenizer_vocab_size=257,
                        seq_length=positions,
                        architecture="llama")
    return EarlyExitGPTConfig(model=model, exits=ExitConfig(exit_layer_nums=[1, 2, 3]),
                              params_dtype="float32", seed=3)


def _train(model, steps: int = 40) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids, labels = synthetic_batch(gen, 8, 32, ASCII)
        out = model(input_ids=ids + ASCII0, labels=labels + ASCII0,
                    loss_mask=torch.ones(labels.shape))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def write_checkpoint(root: str, chat_template: bool = True) -> str:
    from megatron.early_exit.checkpoint import save_checkpoint
    from megatron.early_exit.data.tokenizers import ByteTokenizer, save_tokenizer_files
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel

    cfg = tiny_cfg()
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    _train(chunks[0])
    tok_dir = os.path.join(root, "tokenizer_src")
    files = [save_tokenizer_files(ByteTokenizer(), tok_dir)]
    if chat_template:
        path = os.path.join(tok_dir, "tokenizer_config.json")
        with open(path, "w") as f:
            json.dump({"chat_template": CHATML, "eos_token": "<|end|>"}, f)
        files.append(path)
    ckpt = os.path.join(root, "ckpt")
    save_checkpoint(ckpt, chunks, ctx, cfg, iteration=40, tokenizer_files=files)
    destroy_parallel()
    return ckpt


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def one_rank_world():
    """A gloo world of one rank for the block (unless one exists); the environment variables
    ensure_process_group sets are restored afterwards."""
    from megatron.early_exit.parallel.state import ensure_process_group

    created = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    if created:
        ensure_process_group("gloo")
    try:
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of the tiny checkpoint (written once per pytest session)."""
    with one_rank_world():
        return write_checkpoint(str(tmp_path_factory.mktemp("server_ckpt")))


@pytest.fixture(scope="module")
def engine_tok(tiny_checkpoint):
    """(engine, tokenizer) of the tiny checkpoint on one CPU rank, for this test module."""
    from megatron.early_exit.inference.loading import load_engine
    from megatron.early_exit.parallel.state import destroy_parallel

    with one_rank_world():
        engine, tok = load_engine(tiny_checkpoint, torch.device("cpu"))
        yield engine, tok
        destroy_parallel()


class Server:
    """A running in-process server: ``url``, its ``service``, ``engine`` and ``tok``."""

    def __init__(self, url, service, engine, tok):
        self.url, self.service, self.engine, self.tok = url, service, engine, tok


@contextlib.contextmanager
def running_server(engine, tok, options=None, chat_template=None):
    """Build the app over ``engine`` (the real Scheduler), serve it on a free port, stop it."""
    from megatron.early_exit.server.runtime import ServeOptions, build_app
    from tests.server.harness import serve

    options = options or ServeOptions()
    app, service = build_app(engine, tok, options, chat_template)
    try:
        with serve(app) as url:
            yield Server(url, service, engine, tok)
    finally:
        service.stop()


def chatml():
    from megatron.early_exit.data.tokenizers.chat import ChatTemplate

    return ChatTemplate(CHATML, {"eos_token": "<|end|>"})


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, engine_tok):
    """``greedy(prompt_text, n, mode=None) -> GenerationOutput`` from Engine.generate on the
    checkpoint loaded separately (batch 1, no scheduler, no server): the independent reference."""
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import FullDepth
    from megatron.early_exit.inference.stopping import StopCriteria

    model, cfg, tok = load_for_inference(tiny_checkpoint, torch.device("cpu"))
    eng = Engine(model, cfg)

    def greedy(text, n, mode=None, stop_strings=()):
        stop = StopCriteria(stop_token_ids=frozenset({tok.eod}), stop_strings=tuple(stop_strings))
        ids = text if isinstance(text, list) else tok.tokenize(text)
        return eng.generate([ids], n, mode=mode or FullDepth(), stop=stop,
                            detokenize=tok.detokenize)[0]
    return greedy
