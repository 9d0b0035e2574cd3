"""The `openai` package as a real client of the server: completions, chat, streaming (streamed
text equals non-streamed), early-exit extension fields round-trip; greedy answers equal
Engine.generate on the same checkpoint (batch 1, no scheduler, no server)."""

import openai
import pytest

from megatron.early_exit.inference.modes import EarlyExit, SelfSpeculative
from tests.server.conftest import chatml, running_server


@pytest.fixture(scope="module")
def server(engine_tok):
    with running_server(*engine_tok, chat_template=chatml()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def model_name(client):
    (m,) = client.models.list().data
    return m.id


def test_completion_greedy_equals_engine(client, reference, server):
    name = model_name(client)
    r = client.completions.create(model=name, prompt="Hello there", max_tokens=20, temperature=0)
    want = reference("Hello there", 20)
    (c,) = r.choices
    assert c.text == server.tok.detokenize(want.tokens) and c.finish_reason == want.finish_reason
    assert c.tokens == want.tokens and c.exit_layers == [4] * len(want.tokens)
    assert r.usage.prompt_tokens == len("Hello there") and r.usage.completion_tokens == 20
    assert r.usage.mean_exit_layer == 4.0


def test_extension_fields_round_trip(client, reference):
    name = model_name(client)
    r = client.completions.create(model=name, prompt="Hello there", max_tokens=24, temperature=0,
                                  extra_body={"early_exit_thres": 0.4})
    want = reference("Hello there", 24, EarlyExit(threshold=0.4))
    (c,) = r.choices
    assert c.tokens == want.tokens and c.exit_layers == want.exit_layers
    assert c.confidences == pytest.approx(want.confidences, abs=1e-5)
    assert min(c.exit_layers) < 4, "tau 0.4 should let some tokens exit early on this model"
    assert r.usage.mean_exit_layer == pytest.approx(sum(want.exit_layers) / len(want.exit_layers),
                                                    abs=1e-3)
    r = client.completions.create(model=name, prompt="Hello there", max_tokens=24, temperature=0,
                                  extra_body={"self_speculative": {"draft_exit": 2, "num_draft": 3}})
    spec = reference("Hello there", 24, SelfSpeculative(exit_layer=2, num_draft=3))
    full = reference("Hello there", 24)
    assert r.choices[0].tokens == spec.tokens == full.tokens  # lossless
    assert r.choices[0].exit_layers == spec.exit_layers and set(spec.exit_layers) <= {2, 4}


def test_streaming_equals_non_streaming(client):
    name = model_name(client)
    for kw in ({}, {"extra_body": {"early_exit_thres": 0.4}}, {"stop": ["a2o"]}):
        plain = client.completions.create(model=name, prompt="Hello there", max_tokens=30,
                                          temperature=0, **kw).choices[0]
        chunks = list(client.completions.create(model=name, prompt="Hello there", max_tokens=30,
                                                temperature=0, stream=True, **kw))
        assert "".join(ch.choices[0].text for ch in chunks) == plain.text
        assert sum((ch.choices[0].exit_layers for ch in chunks), []) == plain.exit_layers
        assert sum((ch.choices[0].tokens for ch in chunks), []) == plain.tokens
        assert chunks[-1].choices[0].finish_reason == plain.finish_reason
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    full = client.completions.create(model=name, prompt="Hello there", max_tokens=30,
                                     temperature=0).choices[0].text
    assert "a2o" in full and plain.finish_reason == "stop"  # the stop string straddles tokens
    assert plain.text == full[:full.index("a2o")]


def test_chat_uses_the_template(client, reference, server):
    name = model_name(client)
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    want = reference(chatml().render(msgs), 12)
    assert r.choices[0].message.content == server.tok.detokenize(want.tokens)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(server.tok.tokenize("<|user|>Hi\n<|assistant|>"))
    stream = client.chat.completions.create(model=name, messages=msgs, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_seed_and_errors(client):
    name = model_name(client)
    r = client.completions.create(model=name, prompt=["ab", "cd"], max_tokens=8, temperature=1.0,
                                  seed=11, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model=name, prompt=["ab", "cd"], max_tokens=8,
                                      temperature=1.0, seed=11, n=2)
    assert [c.tokens for c in r.choices] == [c.tokens for c in again.choices]  # seeded: same
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x", max_tokens=8, extra_body={"bogus": 1})
    assert e.value.param == "bogus"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x", max_tokens=8,
                                  extra_body={"early_exit_thres": 0.5, "exit_layers": [4]})
    assert e.value.param == "exit_layers"
