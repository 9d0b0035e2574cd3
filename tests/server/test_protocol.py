"""protocol.py: request bodies -> validated GenerationRequests, errors naming the field (pure)."""

import json
from types import SimpleNamespace

import pytest

from megatron.early_exit.data.tokenizers import ByteTokenizer
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.server.protocol import (ProtocolError, ServerDefaults, build_requests,
                                                 parse_api, parse_chat, parse_completions)


def fake_cfg(vocab=257, positions=256, layers=4, exits=(1, 2, 3)):
    """The config fields validate_request reads (no model is built in these tests)."""
    model = SimpleNamespace(num_tokens=vocab, vocab_size=vocab, max_position_embeddings=positions,
                            num_layers=layers)
    return SimpleNamespace(model=model, exits=SimpleNamespace(exit_layer_nums=list(exits)))


D = ServerDefaults(max_tokens=16, model_name="m")
TOK = ByteTokenizer()


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def refused(parse, raw, field, status=400, match=None):
    with pytest.raises(ProtocolError) as e:
        parse(raw if isinstance(raw, bytes) else body(**raw), D)
    assert e.value.field == field and e.value.status == status, (e.value.field, e.value.message)
    if match:
        assert match in e.value.message
    return e.value


def test_api_fields_megatron_names():
    job = parse_api(body(prompts=["ab", "c"], tokens_to_generate=5, temperature=0.5, top_k=3,
                         top_p=0.0, random_seed=9, stop_sequences=["\n"], logprobs=True,
                         early_exit_thres=0.7, exit_layers=[2]), D)
    assert job.prompts == ["ab", "c"] and job.max_tokens == 5 and job.logprobs
    s = job.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 3, 1.0, 9)  # Megatron top_p 0 = off
    assert job.mode == EarlyExit(threshold=0.7, exit_layers=(2,)) and job.stop_strings == ("\n",)
    assert parse_api(body(prompts=["a"], use_early_exit=False, early_exit_thres=0.3), D).mode == FullDepth()
    assert parse_api(body(prompts=["a"], use_early_exit=True), D).mode == EarlyExit(threshold=0.8)
    assert parse_api(body(prompts=["a"]), D).mode == FullDepth()
    server_tau = ServerDefaults(early_exit_thres=0.6)
    assert parse_api(body(prompts=["a"]), server_tau).mode == EarlyExit(threshold=0.6)
    assert parse_api(body(prompts=["a"], use_early_exit=False), server_tau).mode == FullDepth()
    calibrated = ServerDefaults(early_exit_thres=0.6, exit_layers=(2,))  # the checkpoint's default
    assert parse_api(body(prompts=["a"]), calibrated).mode == EarlyExit(threshold=0.6, exit_layers=(2,))
    assert parse_api(body(prompts=["a"], exit_layers=[1]), calibrated).mode == EarlyExit(
        threshold=0.6, exit_layers=(1,))
    assert parse_api(body(prompts=["a"], early_exit_thres=0.3), calibrated).mode == EarlyExit(threshold=0.3)


@pytest.mark.parametrize("raw,field", [
    (b"{", "body"), (b"[1]", "body"), (b"\xff\xfe", "body"), (b'{"prompts": NaN}', "body"),
    ({"tokens_to_generate": 3}, "prompts"), ({"prompts": []}, "prompts"),
    ({"prompts": "x"}, "prompts"), ({"prompts": [1]}, "prompts"), ({"prompts": [""]}, "prompts"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": True}, "tokens_to_generate"),
    ({"prompts": ["a"], "temperature": -1}, "temperature"),
    ({"prompts": ["a"], "top_p": 1.5}, "top_p"), ({"prompts": ["a"], "top_k": -2}, "top_k"),
    ({"prompts": ["a"], "random_seed": -1}, "random_seed"),
    ({"prompts": ["a"], "early_exit_thres": 2}, "early_exit_thres"),
    ({"prompts": ["a"], "exit_layers": []}, "exit_layers"),
    ({"prompts": ["a"], "use_early_exit": "yes"}, "use_early_exit"),
    ({"prompts": ["a"], "stop_sequences": [""]}, "stop_sequences"),
    ({"prompts": ["a"], "beam_width": 2}, "beam_width"),
    ({"prompts": ["a"], "self_speculative": {"num_draft": 2}}, "self_speculative.draft_exit"),
    ({"prompts": ["a"], "self_speculative": {"draft_exit": 1, "x": 1}}, "self_speculative.x"),
    ({"prompts": ["a"], "self_speculative": {"draft_exit": 1}, "early_exit_thres": 0.5},
     "early_exit_thres"),
])
def test_api_refusals_name_the_field(raw, field):
    refused(parse_api, raw, field)


def test_completions_fields():
    job = parse_completions(body(model="m", prompt=["x", "y"], max_tokens=3, temperature=0, n=2,
                                 seed=4, stop="\n\n", stream=True,
                                 stream_options={"include_usage": True}, logprobs=0,
                                 self_speculative={"draft_exit": 2, "num_draft": 3}), D)
    assert job.prompts == ["x", "y"] and job.n == 2 and job.stream and job.include_usage
    assert job.logprobs and job.stop_strings == ("\n\n",)
    assert job.mode == SelfSpeculative(exit_layer=2, num_draft=3)
    assert parse_completions(body(prompt=[1, 2, 3]), D).prompts == [[1, 2, 3]]
    assert parse_completions(body(prompt=[[1], [2, 3]]), D).prompts == [[1], [2, 3]]
    assert parse_completions(body(prompt="x", max_tokens=2.0), D).max_tokens == 2


@pytest.mark.parametrize("raw,field,status", [
    ({"max_tokens": 3}, "prompt", 400), ({"prompt": []}, "prompt", 400),
    ({"prompt": [1, "a"]}, "prompt", 400), ({"prompt": {"a": 1}}, "prompt", 400),
    ({"prompt": "x", "model": "other"}, "model", 404),
    ({"prompt": "x", "n": 0}, "n", 400), ({"prompt": "x", "n": 99}, "n", 400),
    ({"prompt": "x", "best_of": 3}, "best_of", 400), ({"prompt": "x", "echo": True}, "echo", 400),
    ({"prompt": "x", "logprobs": 3}, "logprobs", 400),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", 400),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"prompt": "x", "stop": [1]}, "stop", 400), ({"prompt": "x", "stop": ["a"] * 9}, "stop", 400),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", 400),
    ({"prompt": "x", "seed": 1e30}, "seed", 400),
    ({"prompt": "x", "temperature": "hot"}, "temperature", 400),
    ({"prompt": "x", "messages": []}, "messages", 400),
])
def test_completions_refusals(raw, field, status):
    refused(parse_completions, raw, field, status)


def test_chat_fields_and_refusals():
    msgs = [{"role": "system", "content": "s"}, {"role": "user",
                                                 "content": [{"type": "text", "text": "a"}]}]
    job = parse_chat(body(messages=msgs, max_completion_tokens=4, logprobs=True), D)
    assert job.prompts == [[{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]]
    assert job.max_tokens == 4 and job.logprobs
    refused(parse_chat, {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role")
    refused(parse_chat, {"messages": [{"role": "user"}]}, "messages[0].content")
    refused(parse_chat, {"messages": [{"role": "user", "content": "x", "x": 1}]}, "messages[0].x")
    refused(parse_chat, {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools")
    refused(parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs")
    refused(parse_chat, {"messages": "hi"}, "messages")


class Upper:
    def render(self, messages):
        return "".join(m["content"].upper() for m in messages) + ":"

    def end_of_turn_ids(self, tokenizer):
        return frozenset(tokenizer.tokenize("\x01"))


def test_build_requests_tokenizes_and_validates():
    cfg = fake_cfg(positions=32)
    job = parse_completions(body(prompt="ab", n=2, seed=5, max_tokens=4, stop=["zz"]), D)
    reqs = build_requests(job, TOK, cfg)
    assert [r.prompt for r in reqs] == [[97, 98]] * 2 and reqs[0].max_new_tokens == 4
    assert [r.sampling.seed for r in reqs] == [5, 6]  # choice c is seeded seed + c
    assert reqs[0].stop.stop_token_ids == {TOK.eod} and reqs[0].stop.stop_strings == ("zz",)
    # no max_tokens: the server default, capped to the free positions
    (r,) = build_requests(parse_completions(body(prompt="a" * 30), D), TOK, cfg)
    assert r.max_new_tokens == 2
    e = pytest.raises(ProtocolError, build_requests,
                      parse_api(body(prompts=["a" * 30], tokens_to_generate=3), D), TOK, cfg).value
    assert e.field == "tokens_to_generate" and "32 positions" in e.message
    e = pytest.raises(ProtocolError, build_requests,
                      parse_completions(body(prompt=[300]), D), TOK, cfg).value
    assert e.field == "prompt"
    e = pytest.raises(ProtocolError, build_requests, parse_completions(
        body(prompt="a", exit_layers=[4], early_exit_thres=0.5), D), TOK, cfg).value
    assert e.field == "exit_layers"
    e = pytest.raises(ProtocolError, build_requests, parse_completions(
        body(prompt="a", stop_token_ids=[999]), D), TOK, cfg).value
    assert e.field == "stop_token_ids"
    chat = parse_chat(body(messages=[{"role": "user", "content": "hi"}]), D)
    assert pytest.raises(ProtocolError, build_requests, chat, TOK, cfg).value.field == "messages"
    (r,) = build_requests(chat, TOK, cfg, chat_template=Upper())
    assert r.prompt == TOK.tokenize("HI:") and r.stop.stop_token_ids == {TOK.eod, 1}
