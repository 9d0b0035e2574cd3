"""Bad input never hurts the server: a fuzz of >= 1000 hostile requests (every field x bad
values, broken JSON, huge bodies, wrong methods and paths) gets only 4xx JSON errors naming
the field, and afterwards the same greedy request gives the same answer. Also: API key (401,
/health open), body limit (413), a full queue answers 429 at once."""

import json
import random
import threading
import time

import httpx
import pytest

from megatron.early_exit.server.app import ServerConfig
from megatron.early_exit.server.runtime import ServeOptions
from tests.server.conftest import chatml, running_server

GOOD = {"/v1/completions": {"prompt": "Hello", "max_tokens": 3, "temperature": 0},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        "/api": {"prompts": ["Hello"], "tokens_to_generate": 3, "temperature": 0}}
BAD_VALUES = [None, True, -1, 0, 1e308, -1e308, 10**30, 2.5, "", "x" * 300, [], [None], {},
              {"a": 1}, [[1, "a"]], "NaN", -0.0, 9999999, [-5], [10**6], "\u0000", ["\ud7ff"]]
RAW_BODIES = [b"", b"{", b"}", b"[]", b"null", b"123", b'"s"', b"\xff\xfe\x00", b'{"a":NaN}',
              b'{"prompt": Infinity}', b'{"prompt": -Infinity}', b"[" * 5000 + b"]" * 5000,
              b'{"prompt": "a", "prompt": 5}', b"{'prompt': 'a'}", b'{"prompt": "\\ud800"}']


def hostile_requests(rng: random.Random):
    """(method, path, body bytes or None, headers) for every field x bad value, raw garbage,
    unknown fields, wrong methods and paths; then random field mixes up to 1000+."""
    out = []
    for path, good in GOOD.items():
        method = "PUT" if path == "/api" else "POST"
        fields = list(good) + ["stop", "seed", "n", "top_p", "top_k", "early_exit_thres",
                               "exit_layers", "self_speculative", "logprobs", "stream",
                               "stop_token_ids", "model", "top_logprobs", "random_seed",
                               "stop_sequences", "use_early_exit"]
        for name in fields:
            for bad in BAD_VALUES:
                out.append((method, path, json.dumps(dict(good, **{name: bad})).encode(), {}))
        for raw in RAW_BODIES:
            out.append((method, path, raw, {}))
        out.append((method, path, json.dumps(dict(good, unknown_field=1)).encode(), {}))
        out.append(("GET", path, None, {}))
        out.append(("DELETE", path, None, {}))
        out.append((method, path, json.dumps(good).encode(), {"content-type": "text/plain"}))
    for path in ("/nope", "/v1", "/v1/completions/x", "/api/../etc/passwd", "/%00", "/metrics/x"):
        out.append(("GET", path, None, {}))
        out.append(("POST", path, b"{}", {}))
    while len(out) < 1100:  # random mixes of several bad fields at once
        path, good = rng.choice(list(GOOD.items()))
        body = dict(good)
        for _ in range(rng.randint(1, 4)):
            body[rng.choice(list(good) + ["seed", "stop", "n", "early_exit_thres"])] = rng.choice(BAD_VALUES)
        out.append(("PUT" if path == "/api" else "POST", path, json.dumps(body).encode(), {}))
    return out


@pytest.fixture(scope="module")
def server(engine_tok):
    opts = ServeOptions(server=ServerConfig(max_body_bytes=64 * 1024, request_timeout=30))
    with running_server(*engine_tok, options=opts, chat_template=chatml()) as srv:
        yield srv


def test_fuzz_never_5xx_and_same_answer_after(server):
    c = httpx.Client(base_url=server.url, timeout=30)
    before = c.post("/v1/completions", json=GOOD["/v1/completions"] | {"max_tokens": 16}).json()
    reqs = hostile_requests(random.Random(0))
    assert len(reqs) >= 1000
    statuses, start = {}, time.monotonic()
    for method, path, body, headers in reqs:
        r = c.request(method, path, content=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body[:200] if body else None, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["code"] == r.status_code and err["message"]
            if r.status_code == 400 and body and body.startswith(b"{") and b"NaN" not in body:
                assert err["param"], (body[:200], err)
        assert time.monotonic() - start < 120, "the fuzz is bounded in time"
    for _ in range(2):  # huge bodies: declared and chunked
        r = c.post("/v1/completions", content=b'{"prompt": "' + b"a" * 100_000 + b'"}')
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = c.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * 70_000, b'"}']))
    assert r.status_code == 413
    after = c.post("/v1/completions", json=GOOD["/v1/completions"] | {"max_tokens": 16}).json()
    assert after["choices"][0]["tokens"] == before["choices"][0]["tokens"]
    assert c.get("/health").json()["status"] == "ok"
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 900


def test_api_key(engine_tok):
    opts = ServeOptions(server=ServerConfig(api_key="s3cret"))
    with running_server(*engine_tok, options=opts) as srv:
        c = httpx.Client(base_url=srv.url, timeout=30)
        assert c.get("/health").status_code == 200  # open without the key
        assert c.get("/").status_code == 200  # the static page: its API calls send the key
        assert c.post("/").status_code == 401
        for path in ("/v1/models", "/metrics", "/info", "/nope"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = c.post("/v1/completions", json=GOOD["/v1/completions"],
                     headers={"Authorization": "Bearer s3cre"})
        assert bad.status_code == 401
        ok = c.post("/v1/completions", json=GOOD["/v1/completions"],
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["tokens"]) == 3


def test_full_queue_answers_429_at_once(engine_tok):
    opts = ServeOptions(max_batch_size=1, max_queue=2, server=ServerConfig(request_timeout=60))
    with running_server(*engine_tok, options=opts) as srv:
        long = {"prompt": "Hello", "max_tokens": 100, "temperature": 0}
        results = []

        def send():
            results.append(httpx.post(srv.url + "/v1/completions", json=long, timeout=60).status_code)

        threads = [threading.Thread(target=send) for _ in range(3)]  # 1 running + 2 waiting
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while srv.service.num_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.service.num_waiting == 2 and srv.service.num_running == 1
        start = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json=long, timeout=60)
        assert r.status_code == 429 and time.monotonic() - start < 2.0
        assert r.json()["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200]
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'ee_requests_total{endpoint="completions",status="429"} 1.0' in metrics


class FaultyOnce:
    """The real Scheduler, except that one step() raises (a genuine engine fault)."""

    def __init__(self, scheduler):
        self.scheduler, self.armed = scheduler, False

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected engine fault")
        return self.scheduler.step()


def test_engine_fault_is_a_logged_500_and_serving_goes_on(engine_tok, caplog):
    from megatron.early_exit.server.runtime import build_app, make_scheduler
    from tests.server.harness import serve

    engine, tok = engine_tok
    opts = ServeOptions()
    faulty = FaultyOnce(make_scheduler(engine, tok, opts))
    app, service = build_app(engine, tok, opts, scheduler=faulty)
    try:
        with serve(app) as url, caplog.at_level("ERROR"):
            good = httpx.post(url + "/v1/completions", json=GOOD["/v1/completions"], timeout=60)
            faulty.armed = True
            r = httpx.post(url + "/v1/completions", json=GOOD["/v1/completions"], timeout=60)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "injected engine fault" in caplog.text and "Traceback" in caplog.text
            again = httpx.post(url + "/v1/completions", json=GOOD["/v1/completions"], timeout=60)
            assert again.status_code == 200
            assert again.json()["choices"][0]["tokens"] == good.json()["choices"][0]["tokens"]
            assert service.num_running == 0
    finally:
        service.stop()
