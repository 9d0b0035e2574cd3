"""Send prompts to a running generation server (PUT /api) and print the text, each token's exit
layer and confidence, and the latency.

    python tools/request_client.py --prompt "ROMEO:" --tokens-to-generate 32 --early-exit-thres 0.8
    python tools/request_client.py --url http://127.0.0.1:5000 --prompt "a" --prompt "b" --json

Standard library only (urllib). ``--api-key`` (or $EE_API_KEY) sends ``Authorization: Bearer``.
An error answer is printed as ``error: <param>: <message>`` with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.early_exit.cli import UsageError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Query a generation server's PUT /api.")
    p.add_argument("--url", default="http://127.0.0.1:5000", help="Server address.")
    p.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    p.add_argument("--tokens-to-generate", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0, help="0 = off (Megatron's convention).")
    p.add_argument("--random-seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--early-exit-thres", type=float, help="Confidence threshold tau.")
    mode.add_argument("--no-early-exit", action="store_true", help="Full depth.")
    mode.add_argument("--draft-exit", type=int, help="Self-speculative decoding from this exit.")
    p.add_argument("--exit-layers", type=int, nargs="+", help="Exits allowed to fire.")
    p.add_argument("--api-key", default=os.environ.get("EE_API_KEY"))
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait.")
    p.add_argument("--json", action="store_true", help="Print the server's JSON answer.")
    return p


def request_body(args) -> dict:
    body = {"prompts": args.prompt, "tokens_to_generate": args.tokens_to_generate,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.random_seed is not None:
        body["random_seed"] = args.random_seed
    if args.stop:
        body["stop_sequences"] = args.stop
    if args.no_early_exit:
        body["use_early_exit"] = False
    if args.early_exit_thres is not None:
        body["early_exit_thres"] = args.early_exit_thres
    if args.exit_layers:
        if args.draft_exit is not None:
            raise UsageError("--exit-layers", "has no effect with --draft-exit")
        body["exit_layers"] = args.exit_layers
    if args.draft_exit is not None:
        body["self_speculative"] = {"draft_exit": args.draft_exit}
    return body


def put(url: str, body: dict, api_key, timeout: float):
    """(status, parsed JSON) of PUT url/api."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/api", data=json.dumps(body).encode(),
                                 headers=headers, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except urllib.error.URLError as e:
        raise UsageError("--url", f"cannot reach {url}: {e.reason}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    status, out = put(args.url, request_body(args), args.api_key, args.timeout)
    latency = time.perf_counter() - start
    if status != 200:
        err = out.get("error", {})
        print(f"error: {err.get('param') or status}: {err.get('message', out)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    for i, text in enumerate(out["text"]):
        layers, confs = out["exit_layers"][i], out["confidences"][i]
        print(text)
        print("exit layers: " + " ".join(map(str, layers)))
        print("confidences: " + " ".join(f"{c:.2f}" for c in confs))
        mean = sum(layers) / len(layers) if layers else float("nan")
        print(f"({len(layers)} tokens, mean exit layer {mean:.2f}, finish: "
              f"{out['finish_reasons'][i]})")
    n = sum(len(t) for t in out["tokens"])
    print(f"latency {latency * 1000:.0f} ms, {n / latency:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
