"""The generation server (tools/run_text_generation_server.py; docs/serving.md).

Modules: ``protocol`` (request bodies -> validated GenerationRequests, pure), ``results``
(updates -> text, response and stream-chunk shapes, pure), ``service`` (the engine-loop thread
that owns the Scheduler; submit / cancel; the plan broadcast of TP/PP ranks), ``app`` (FastAPI
endpoints), ``guard`` (API key, body limit), ``metrics`` (Prometheus), ``runtime`` (wiring on
every rank), ``static/index.html`` (the page at GET /). Imports point one way: the server uses
inference only.

Tests: ``python -m pytest -q tests/server``.
"""
