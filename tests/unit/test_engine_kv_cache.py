"""The static KV cache: layouts and masks, rollback, and the recompute invariant (every
layer's filled prefix, and after a full-depth pass the whole cache, equals the keys/values of
a fresh no-cache forward over the same token ids, exit blocks included).

Run: ``python -m pytest -q tests/unit/test_engine_kv_cache.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.exit_points import exit_depth
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.static_early_exit import StaticRunner
from megatron.early_exit.inference.kv_cache import KVCache, make_layout
from megatron.early_exit.inference.modes import EarlyExit, SelfSpeculative
from tests.unit.engine_testlib import random_prompts, trained


def test_layout_is_end_aligned_with_causal_per_row_mask():
    lay = make_layout([0, 2], starts=[3, 0], ends=[5, 3], max_len=8, device=torch.device("cpu"), batch=3)
    assert lay.s == 3 and not lay.full_batch and lay.counts == [2, 3]
    assert lay.pos.t().tolist() == [[3, 3, 4], [0, 1, 2]]  # slot 0 of row 0 is padding
    assert lay.valid.t().tolist() == [[False, True, True], [True, True, True]]
    assert lay.write_idx.t().tolist() == [[8, 3, 4], [0, 1, 2]]  # padding -> scratch slot 8
    mask = lay.mask[:, 0]  # [b, s, S=5]
    assert mask[0, 2].tolist() == [True] * 5 and mask[0, 1].tolist() == [True] * 4 + [False]
    assert mask[1, 0].tolist() == [True] + [False] * 4
    assert mask.any(-1).all(), "every query (padding too) must attend to something"


def test_hook_writes_reads_and_truncates():
    mods = [torch.nn.Module(), torch.nn.Module()]
    for m in mods:
        m.kv_hook = None
    cache = KVCache(mods, batch=2, max_len=6, num_groups=1, head_dim=2,
                    dtype=torch.float64, device=torch.device("cpu"))
    cache.check = True
    with cache.attach():
        assert mods[0].kv_hook == cache.hook
        cache.layout = make_layout([0, 1], [0, 0], [3, 1], 6, torch.device("cpu"), 2)
        key = torch.arange(6, dtype=torch.float64).view(3, 2, 1, 1).expand(3, 2, 1, 2)
        k_all, v_all, mask = cache.hook(mods[1], key, -key)
        assert k_all.shape == (3, 2, 1, 2) and mask.shape == (2, 1, 3, 3)
        assert cache.lengths.tolist() == [[0, 0], [3, 1]]
        assert k_all[:, 0, 0, 0].tolist() == [0, 2, 4]  # row 0: positions 0..2
        assert k_all[0, 1, 0, 0].item() == 5  # row 1: its single token at position 0
        cache.layout = make_layout([1], [1], [2], 6, torch.device("cpu"), 2)
        with pytest.raises(AssertionError):  # module 0 holds nothing for row 1 yet
            cache.hook(mods[0], key[:1, :1], key[:1, :1])
    assert mods[0].kv_hook is None and cache.layout is None
    cache.truncate([0], [2])
    assert cache.lengths.tolist() == [[0, 0], [2, 1]]


def _reference_kv(model, modules, seq):
    """Keys/values [n, ng, hn] that every attention module sees in a plain forward on seq."""
    got = {}

    def grab(mod, args):
        got[id(mod)] = (args[1][:, 0].clone(), args[2][:, 0].clone())  # key/value [n, ng, hn]

    handles = [m.register_forward_pre_hook(grab) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    return got


def _check_cache(sess, model, cfg, exit_layers):
    """Layer j holds exactly full + #(pending depth >= j) positions of each row, and they
    equal the fresh forward's keys/values; blocks of the used exits likewise."""
    depth_of = {id(layer.self_attention.core_attention): j + 1
                for j, layer in enumerate(model.decoder.layers)}
    for k in exit_layers:
        block = model.exits[str(k)].block
        if block is not None:
            depth_of[id(block.self_attention.core_attention)] = exit_depth(cfg, k)
    mods = [m for m in sess.cache.modules if id(m) in depth_of]
    full_passes = 0
    for r, st in sess.states.items():
        seq = sess.prompts[r] + sess.outputs[r].tokens
        ref = _reference_kv(model, mods, seq[: st.newest])
        full_passes += not st.pend
        for m in mods:
            d = depth_of[id(m)]
            n = st.full + sum(p >= d for p in st.pend)
            assert sess.cache.lengths[sess.cache.index[id(m)], r].item() == n
            k, v = sess.cache.module_kv(m, r, n)
            ref_k, ref_v = ref[id(m)]
            torch.testing.assert_close(k, ref_k[:n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, ref_v[:n], rtol=1e-5, atol=1e-5)
    return full_passes


@pytest.mark.parametrize("variant,mode", [
    ("llama-block", EarlyExit(threshold=0.5, max_pending=4)),
    ("gpt2-pre-exit-block", EarlyExit(threshold=0.3, max_pending=3)),
    ("llama-norm-mlp-pre", EarlyExit(threshold=0.4)),
    ("gpt2-pre-exit-block", SelfSpeculative(exit_layer=2, num_draft=3)),
])
def test_cache_equals_fresh_prefill(variant, mode, single_rank_parallel):
    cfg, model = trained(variant, dtype="float32")
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(9), 3, cfg.model.vocab_size, 1, 9)
    sess = engine.session(prompts, 14, mode=mode)
    sess.cache.check = True
    used = [mode.exit_layer] if isinstance(mode, SelfSpeculative) else cfg.exits.exit_layer_nums
    full_passes, pending_seen = 0, False
    while not sess.done:
        with sess.attached():
            sess.step()
        pending_seen |= any(st.pend for st in sess.states.values())
        full_passes += _check_cache(sess, model, cfg, used)
    assert full_passes > 0
    if isinstance(mode, EarlyExit):
        assert pending_seen, "no token exited early: the test does not exercise recompute"


@pytest.mark.parametrize("variant,mode", [
    ("llama", EarlyExit(threshold=0.5, max_pending=3)),
    ("llama-norm-mlp-pre", EarlyExit(threshold=0.4)),
])
def test_static_early_exit_cache_equals_fresh_prefill(variant, mode, single_rank_parallel):
    """The same invariant for batch-1 early exit on static segments (static_early_exit.py)."""
    cfg, model = trained(variant, dtype="float32")
    engine = Engine(model, cfg, fast_decode="static")
    full_passes, pending_seen = 0, False
    for p in random_prompts(torch.Generator().manual_seed(10), 3, cfg.model.vocab_size, 1, 9):
        sess = engine.session([p], 14, mode=mode)
        assert isinstance(sess.runner, StaticRunner)
        sess.cache.check = True
        while not sess.done:
            with sess.attached():
                sess.step()
            pending_seen |= any(st.pend for st in sess.states.values())
            full_passes += _check_cache(sess, model, cfg, cfg.exits.exit_layer_nums)
    assert full_passes > 0 and pending_seen
