"""Many clients at once and clients that leave: 64 concurrent clients are all answered, each
greedy answer equal to Engine.generate on that prompt alone; a client that disconnects
(streaming or not) has its request cancelled and its row freed, so a following request is not
delayed by it; a request past --request-timeout ends with finish_reason "timeout"."""

import asyncio
import re
import time

import httpx
import pytest

from megatron.early_exit.inference.modes import EarlyExit
from megatron.early_exit.server.app import ServerConfig
from megatron.early_exit.server.runtime import ServeOptions
from tests.server.conftest import running_server

PROMPTS = ["Hello there", "ab", "To be", "ROMEO:", "x", "Queen", "1234", "What?"]


def generated_tokens(url) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^ee_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_64_concurrent_clients_equal_solo(engine_tok, reference):
    opts = ServeOptions(max_batch_size=8, max_queue=64)
    modes = [("full", {}, None), ("tau", {"early_exit_thres": 0.4}, EarlyExit(threshold=0.4))]
    want = {(p, m): reference(p, 12, mode).tokens for p in PROMPTS for m, _, mode in modes}

    async def one(client, i):
        p, (m, extra, _) = PROMPTS[i % len(PROMPTS)], modes[(i // len(PROMPTS)) % 2]
        body = {"prompt": p, "max_tokens": 12, "temperature": 0, **extra}
        if i % 3 == 0:  # a third of the clients stream
            tokens = []
            async with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += __import__("json").loads(line[6:])["choices"][0]["tokens"]
            return (p, m), tokens
        r = await client.post("/v1/completions", json=body)
        return (p, m), r.json()["choices"][0]["tokens"]

    async def all_clients(url):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 120)

    with running_server(*engine_tok, options=opts) as srv:
        got = asyncio.run(all_clients(srv.url))
    assert len(got) == 64
    for key, tokens in got:
        assert tokens == want[key], key


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_the_row(engine_tok, stream):
    opts = ServeOptions(max_batch_size=1, server=ServerConfig(request_timeout=60))
    long_tokens = 200
    with running_server(*engine_tok, options=opts) as srv:
        body = {"prompt": "Hello", "max_tokens": long_tokens, "temperature": 0}
        if stream:
            with httpx.stream("POST", srv.url + "/v1/completions", json=dict(body, stream=True),
                              timeout=60) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass  # leave after the first token
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
        # the only row was the long request's; the next one needs it back
        start = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json=dict(body, max_tokens=5), timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["tokens"]) == 5
        assert generated_tokens(srv.url) < long_tokens, "the long request ran on"
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 10
        while srv.service.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.service.num_running == 0 and srv.service.num_waiting == 0


def test_request_timeout(engine_tok):
    opts = ServeOptions(server=ServerConfig(request_timeout=0.3))
    with running_server(*engine_tok, options=opts) as srv:
        body = {"prompt": "Hello", "max_tokens": 240, "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        (c,) = r.json()["choices"]
        assert r.status_code == 200 and c["finish_reason"] == "timeout"
        assert 0 < len(c["tokens"]) < 240
        lines = [x for x in httpx.post(srv.url + "/v1/completions", json=dict(body, stream=True),
                                       timeout=60).text.splitlines() if x]
        assert '"finish_reason": "timeout"' in [x for x in lines if x.startswith("data: {")][-1]
        assert lines[-1] == "data: [DONE]"
