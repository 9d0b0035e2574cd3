"""Serve an early-exit checkpoint over HTTP: Megatron's PUT /api and OpenAI's /v1 endpoints.

    python tools/run_text_generation_server.py --load ckpt                    # 127.0.0.1:5000
    python tools/run_text_generation_server.py --load ckpt --early-exit-thres 0.8 --api-key KEY
    torchrun --nproc-per-node 4 tools/run_text_generation_server.py --load ckpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Endpoints (docs/serving.md): PUT /api, POST /v1/completions, POST /v1/chat/completions (SSE
with "stream": true), GET /v1/models, /health, /metrics, /info and the page at GET /. Rank 0
serves HTTP and broadcasts each scheduled step to the other ranks (server/runtime.py). The
server binds 127.0.0.1 unless ``--host`` says otherwise. Ctrl-C (SIGINT) or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve an early-exit checkpoint over HTTP.")
    p.add_argument("--load", required=True, help="Checkpoint directory.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=5000, help="TCP port (default 5000).")
    p.add_argument("--api-key", help="Require 'Authorization: Bearer KEY' (all but /health and "
                                     "the page at /). "
                                     "Default: $EE_API_KEY if set.")
    p.add_argument("--max-batch-size", type=int, default=8, help="Requests decoded together.")
    p.add_argument("--max-queue", type=int, default=64, help="Waiting requests before 429.")
    p.add_argument("--max-cached-tokens", type=int, help="KV cache budget in tokens.")
    p.add_argument("--request-timeout", type=float, default=300.0, help="Seconds per request.")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="Request body limit.")
    p.add_argument("--max-tokens", type=int, default=64, help="Default max new tokens.")
    p.add_argument("--served-model-name", default=None, help="Model name in the OpenAI API "
                                                             "(default: the --load folder name).")
    p.add_argument("--early-exit-thres", type=float, help="Server-wide default tau (requests may "
                                                          "override; default: the checkpoint's "
                                                          "calibrated default if it has one "
                                                          "(tools/calibrate_threshold.py "
                                                          "--write-default), else full depth).")
    p.add_argument("--confidence", choices=["max_prob", "margin", "classifier"],
                   help="What every tau thresholds (with --early-exit-thres; default max_prob, "
                        "or the calibrated default's kind): max softmax probability, top-1 minus "
                        "top-2, or the exits' fitted classifiers.")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="Weights dtype.")
    return p


def check_args(args) -> None:
    for flag, value, lo in (("--port", args.port, 1), ("--max-batch-size", args.max_batch_size, 1),
                            ("--max-queue", args.max_queue, 1), ("--max-tokens", args.max_tokens, 1),
                            ("--max-body-bytes", args.max_body_bytes, 1024),
                            ("--tensor-model-parallel-size", args.tensor_model_parallel_size, 1),
                            ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size, 1)):
        if value < lo:
            raise UsageError(flag, f"must be >= {lo}, got {value}")
    if args.port > 65535:
        raise UsageError("--port", f"must be <= 65535, got {args.port}")
    if not args.request_timeout > 0:
        raise UsageError("--request-timeout", f"must be > 0, got {args.request_timeout}")
    t = args.early_exit_thres
    if t is not None and not 0.0 <= t <= 1.0:
        raise UsageError("--early-exit-thres", f"must be in [0, 1], got {t}")
    if args.confidence is not None and t is None:
        raise UsageError("--confidence", "has no effect without --early-exit-thres (a calibrated "
                         "default brings its own kind)")
    if args.max_cached_tokens is not None and args.max_cached_tokens < 1:
        raise UsageError("--max-cached-tokens", f"must be >= 1, got {args.max_cached_tokens}")
    if not os.path.isdir(args.load):
        raise UsageError("--load", f"{args.load!r} is not a directory")


def chat_template_of(load_dir: str):
    """The chat template saved with the checkpoint's tokenizer files, or None."""
    from megatron.early_exit.checkpoint.load import checkpoint_tokenizer_files
    from megatron.early_exit.data.tokenizers.chat import ChatTemplate

    files = checkpoint_tokenizer_files(load_dir)
    return ChatTemplate.from_directory(os.path.dirname(files[0])) if files else None


def options_of(args, pipeline: bool):
    from megatron.early_exit.server.app import ServerConfig
    from megatron.early_exit.server.protocol import ServerDefaults
    from megatron.early_exit.server.runtime import ServeOptions

    name = args.served_model_name or os.path.basename(os.path.abspath(args.load))
    tau, layers, kind = args.early_exit_thres, None, args.confidence or "max_prob"
    if tau is None:
        from megatron.early_exit.checkpoint.serving import serving_defaults

        saved = serving_defaults(args.load) or {}
        tau, layers = saved.get("early_exit_thres"), saved.get("exit_layers")
        kind = saved.get("confidence") or "max_prob"
        if tau is not None:
            print(f"default tau={tau}" + (f", exits {layers}" if layers else "") + f", confidence {kind}"
                  + ": the checkpoint's calibrated serving default", flush=True)
    defaults = ServerDefaults(max_tokens=args.max_tokens, early_exit_thres=tau, model_name=name,
                              confidence=kind,
                              exit_layers=tuple(layers) if layers else None)
    server = ServerConfig(defaults=defaults, api_key=args.api_key or os.environ.get("EE_API_KEY"),
                          request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                          pipeline=pipeline)
    return ServeOptions(server=server, max_batch_size=args.max_batch_size,
                        max_queue=args.max_queue, max_cached_tokens=args.max_cached_tokens)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch
    import uvicorn

    from megatron.early_exit.checkpoint.format import CheckpointError
    from megatron.early_exit.inference.loading import load_engine
    from megatron.early_exit.server.runtime import serve_ranks

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        engine, tokenizer = load_engine(args.load, device,
                                        tensor_model_parallel_size=args.tensor_model_parallel_size,
                                        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                        dtype=args.dtype)
    except (FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        raise blame("--load", e) from None
    if tokenizer is None:
        raise UsageError("--load", f"{args.load} holds no tokenizer files")
    options = options_of(args, pipeline=args.pipeline_model_parallel_size > 1)
    if options.server.defaults.confidence == "classifier" and not engine.cfg.exits.use_exit_classifier:
        raise UsageError("--confidence", "classifier: the checkpoint's exits have no classifiers "
                         "(tools/fit_exit_classifier.py fits them)")

    def run_http(app):
        print(f"serving {options.server.defaults.model_name} on http://{args.host}:{args.port}",
              flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=5)

    serve_ranks(engine, tokenizer, options, chat_template_of(args.load), run_http)


if __name__ == "__main__":
    run_cli(main)
