"""The page at GET / in a real headless browser (Debian's chromium driven by Playwright; no
browser is downloaded): type a prompt, pick early exit, get the streamed tokens coloured by
the layer they exited at, equal to the API's answer for the same request."""

import os
import shutil

import httpx
import pytest

from tests.server.conftest import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), headless=True,
                                                   executable_path=CHROMIUM, args=ARGS)
        ctx.set_default_timeout(30_000)
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def test_page_streams_coloured_tokens(engine_tok, browser_page):
    page = browser_page
    with running_server(*engine_tok) as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector("#legend span")
        assert "4 layers, exits at [1, 2, 3]" in page.inner_text("#model")
        page.fill("#prompt", "Hello there")
        page.check("input[value=early]")
        page.fill("#tau", "0.4")
        page.fill("#max", "16")
        page.click("#go")
        page.wait_for_selector("#output[data-done='1']")
        assert page.inner_text("#error") == ""
        spans = page.eval_on_selector_all(
            "#output span.tok", "els => els.map(e => [e.textContent, Number(e.dataset.layer), "
                                "getComputedStyle(e).backgroundColor])")
        want = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "prompt": "Hello there", "max_tokens": 16, "temperature": 0,
            "early_exit_thres": 0.4}).json()["choices"][0]
    assert "".join(s[0] for s in spans) == want["text"]
    assert [s[1] for s in spans] == want["exit_layers"]
    colour = {}
    for _, layer, bg in spans:  # one colour per exit layer, none for the final layer
        colour.setdefault(layer, set()).add(bg)
    assert all(len(c) == 1 for c in colour.values())
    assert colour.get(4, {"rgba(0, 0, 0, 0)"}) == {"rgba(0, 0, 0, 0)"}
    exits = [next(iter(c)) for layer, c in colour.items() if layer < 4]
    assert exits and len(set(exits)) == len(exits) and "rgba(0, 0, 0, 0)" not in exits
    stats = page.inner_text("#stats")
    assert stats.startswith("16 tokens") and "tokens/s" in stats and "mean exit layer" in stats
