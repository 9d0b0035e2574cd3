"""PUT /api with Megatron / EE-LLM field names and response shape (text = prompt + generation,
segments, per-token exit_layers and confidences for every prompt), checked against
Engine.generate and, for logprobs, the model's own forward pass."""

import httpx
import pytest
import torch

from megatron.early_exit.inference.modes import EarlyExit
from tests.server.conftest import running_server


@pytest.fixture(scope="module")
def server(engine_tok):
    with running_server(*engine_tok) as srv:
        yield srv


def put(server, **body):
    return httpx.put(server.url + "/api", json=body, timeout=60)


def test_api_shape_and_tokens(server, reference):
    prompts = ["Hello there", "ab"]
    r = put(server, prompts=prompts, tokens_to_generate=10, temperature=0.0, top_k=0, top_p=0.0,
            random_seed=3, use_early_exit=True, early_exit_thres=0.4, exit_layers=[1, 2, 3])
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "segments", "tokens", "exit_layers", "confidences",
                        "finish_reasons"}
    tok = server.tok
    for i, p in enumerate(prompts):
        want = reference(p, 10, EarlyExit(threshold=0.4, exit_layers=(1, 2, 3)))
        assert out["tokens"][i] == want.tokens and out["exit_layers"][i] == want.exit_layers
        assert out["text"][i] == p + tok.detokenize(want.tokens)  # Megatron: prompt + generation
        assert out["segments"][i] == [tok.detokenize([t]) for t in want.tokens]
        assert out["confidences"][i] == pytest.approx(want.confidences, abs=1e-5)
        assert out["finish_reasons"][i] == "length"
    full = put(server, prompts=prompts, tokens_to_generate=10, use_early_exit=False,
               early_exit_thres=0.4, temperature=0.0).json()
    assert full["exit_layers"] == [[4] * 10, [4] * 10]
    assert full["tokens"] == [reference(p, 10).tokens for p in prompts]


def test_api_logprobs_and_stop(server, tiny_checkpoint):
    from megatron.early_exit.inference.loading import load_for_inference

    r = put(server, prompts=["Hello there"], tokens_to_generate=4, temperature=0.0, logprobs=True,
            stop_sequences=["a2o"])
    out = r.json()
    toks, lps = out["tokens"][0], out["logprobs"][0]
    assert len(lps) == len(toks) == 4
    model, _, tok = load_for_inference(tiny_checkpoint, torch.device("cpu"))
    seq = tok.tokenize("Hello there")
    with torch.no_grad():
        for t, lp in zip(toks, lps):  # log p(token) under the final head, full forward
            logits = model(input_ids=torch.tensor([seq]), return_logits=True).final_logits[-1, 0]
            want = torch.log_softmax(logits.double()[:tok.vocab_size], -1)[t]
            assert lp == pytest.approx(float(want), abs=1e-4)
            seq.append(t)
    stopped = put(server, prompts=["Hello there"], tokens_to_generate=30, temperature=0.0,
                  stop_sequences=["a2o"], echo_prompts=False).json()
    full = put(server, prompts=["Hello there"], tokens_to_generate=30, temperature=0.0).json()
    gen = full["text"][0][len("Hello there"):]
    assert stopped["text"][0] == gen[:gen.index("a2o")] and stopped["finish_reasons"] == ["stop"]


def test_api_errors_name_megatron_fields(server):
    for body, field in (({"prompts": ["x"], "tokens_to_generate": 1000}, "tokens_to_generate"),
                        ({"prompts": ["x"], "early_exit_thres": 1.5}, "early_exit_thres"),
                        ({"prompts": ["x"], "exit_layers": [7], "use_early_exit": True},
                         "exit_layers"),
                        ({"prompts": ["x"], "self_speculative": {"draft_exit": 4}},
                         "self_speculative.draft_exit"),
                        ({"prompt": "x"}, "prompt")):
        r = put(server, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    assert httpx.post(server.url + "/api", json={"prompts": ["x"]}).status_code == 405


def test_metrics_count_what_was_served(engine_tok):
    with running_server(*engine_tok) as srv:
        outs = [put(srv, prompts=["Hello there", "ab"], tokens_to_generate=9, temperature=0.0,
                    early_exit_thres=0.4).json(),
                httpx.post(srv.url + "/v1/completions", timeout=60, json={
                    "prompt": "To be", "max_tokens": 5, "stream": True}).text]
        put(srv, prompts=["x"], tokens_to_generate=0)  # a 400
        text = httpx.get(srv.url + "/metrics").text
    layers = [layer for row in outs[0]["exit_layers"] for layer in row] + [4] * 5

    def value(name):
        import re

        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    assert value("ee_generated_tokens_total") == len(layers) == 23
    assert value("ee_exit_layer_count") == len(layers) and value("ee_exit_layer_sum") == sum(layers)
    for k in (1, 2, 3):
        assert value(f'ee_exit_layer_bucket{{le="{k}.0"}}') == sum(x <= k for x in layers)
    assert value('ee_requests_total{endpoint="api",status="200"}') == 1
    assert value('ee_requests_total{endpoint="api",status="400"}') == 1
    assert value('ee_requests_total{endpoint="completions",status="200"}') == 1
    assert value("ee_time_to_first_token_seconds_count") == 2
    assert value("ee_running_rows") == 0 and value("ee_queue_length") == 0
    assert value("ee_tokens_per_second") > 0
