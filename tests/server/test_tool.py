"""tools/run_text_generation_server.py as a user runs it: bad flags get one ``error: --flag``
line (exit 2); a plain process serves the checkpoint, the README's curl and openai examples
work as written against it (only the port is changed), tools/request_client.py prints text,
exit layers and latency, and SIGINT stops it."""

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.distributed_harness import free_port

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/run_text_generation_server.py"


def _tool():
    spec = importlib.util.spec_from_file_location("serve_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,line", [
    (["--load", "/nonexistent"], "error: --load: '/nonexistent' is not a directory"),
    (["--load", ".", "--port", "0"], "error: --port: must be >= 1, got 0"),
    (["--load", ".", "--port", "70000"], "error: --port: must be <= 65535, got 70000"),
    (["--load", ".", "--early-exit-thres", "1.5"], "error: --early-exit-thres: must be in [0, 1]"),
    (["--load", ".", "--max-batch-size", "0"], "error: --max-batch-size: must be >= 1, got 0"),
    (["--load", ".", "--request-timeout", "0"], "error: --request-timeout: must be > 0"),
])
def test_bad_flags(argv, line, capsys):
    from megatron.early_exit.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(_tool().main, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith(line)


def serving_snippets():
    """(server command, curl commands, python code) of README.md's Serving section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    bash = [b for kind, b in blocks if kind == "bash"]
    (python,) = [b for kind, b in blocks if kind == "python"]
    server = bash[0].split("#")[0].strip()
    curls = [c.strip() for c in bash[1].replace("\\\n", " ").splitlines() if c.strip()]
    return server, curls, python


def test_serve_readme_examples_and_client(tiny_checkpoint):
    server_cmd, curls, python = serving_snippets()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fix = lambda s: s.replace("http://127.0.0.1:5000", url)  # noqa: E731
    argv = shlex.split(server_cmd)
    assert argv[:2] == ["python", "tools/run_text_generation_server.py"] and "--load" in argv
    argv[argv.index("--load") + 1] = tiny_checkpoint  # the README's "ckpt": our checkpoint
    assert os.path.basename(tiny_checkpoint) == "ckpt"  # so the examples' model name holds
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}  # a plain process
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable] + argv[1:] + ["--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        api = json.loads(subprocess.run(shlex.split(fix(curls[0])), capture_output=True,
                                        check=True, timeout=60).stdout)
        assert len(api["tokens"][0]) == 24 and len(api["exit_layers"][0]) == 24
        assert api["text"][0].startswith("ROMEO:")
        sse = subprocess.run(shlex.split(fix(curls[1])), capture_output=True, check=True,
                             timeout=60).stdout.decode()
        assert sse.rstrip().endswith("data: [DONE]") and sse.count("data: {") >= 24
        ran = subprocess.run([sys.executable, "-c", fix(python)], capture_output=True, text=True,
                             timeout=120, env=env)
        assert ran.returncode == 0, ran.stderr
        assert re.search(r"\[(\d, )+\d\] \d\.\d+", ran.stdout), ran.stdout  # exit layers, mean
        client = subprocess.run([sys.executable, "tools/request_client.py", "--url", url,
                                 "--prompt", "ROMEO:", "--tokens-to-generate", "8",
                                 "--early-exit-thres", "0.4"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        out = client.stdout.splitlines()
        assert client.returncode == 0 and out[0].startswith("ROMEO:"), client.stderr
        assert len(out[1].split(":")[1].split()) == 8 and out[-1].startswith("latency ")
        bad = subprocess.run([sys.executable, "tools/request_client.py", "--url", url,
                              "--prompt", "x", "--early-exit-thres", "3"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and bad.stderr.startswith("error: early_exit_thres:")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, proc.stdout.read()


@pytest.mark.parametrize("env,launcher", [({}, "python"), ({"TP": "2", "PP": "2"}, "torchrun")])
def test_serve_sh_builds_the_command(env, launcher):
    out = subprocess.run(["bash", str(ROOT / "examples/serve.sh")], capture_output=True,
                         text=True, timeout=30, check=True,
                         env=dict(os.environ, DRY_RUN="1", CKPT="ck", TAU="0.8", **env)).stdout
    argv = shlex.split(out)
    assert argv[0].startswith("OMP_NUM_THREADS=") and argv[1] == launcher
    if launcher == "torchrun":
        assert argv[2:5] == ["--standalone", "--nproc-per-node", "4"]
    tool_args = argv[argv.index(str(TOOL)) + 1:]
    args = _tool().build_parser().parse_args(tool_args)  # every flag is the tool's
    assert (args.load, args.host, args.port, args.early_exit_thres) == ("ck", "127.0.0.1", 5000, 0.8)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (
        int(env.get("TP", 1)), int(env.get("PP", 1)))
