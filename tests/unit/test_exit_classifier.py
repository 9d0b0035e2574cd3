"""Exit confidence classifiers (CALM-style): decoding, fitting, the tools.

- Decoding with ``confidence="classifier"`` equals a no-cache reference that recomputes the whole
  sequence every step and applies the rule by hand: the first allowed exit whose
  ``sigmoid(h . w + b) >= tau`` (h: the head's projection input, w, b read from the parameters)
  gives the token (its logits' argmax), else the final head; tokens, exit layers and the scores.
- The vocabulary projection of an exit runs only for the rows that leave there.
- ``fit_logistic`` reaches the optimum (the objective's gradient, written out by hand, vanishes)
  and ``auc`` equals the pairwise count.
- tools/fit_exit_classifier.py then tools/calibrate_threshold.py --confidence classifier: the
  backbone and heads are untouched, the chosen tau's agreement re-measured one prefix at a time
  meets the target, and the serving default records the kind. Bad input names its flag.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_exit_classifier.py``.
"""

import importlib.util
import json
import os

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit
from tests.unit.engine_testlib import build, make_cfg, random_prompts, trained
from tests.unit.test_calibrate_threshold import calibrated_ckpt  # noqa: F401 (a fixture)
from tests.unit.test_calibrate_threshold import prefix_agreement

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_classifiers(variant: str, seed: int = 0):
    """(cfg, model): the trained ``variant`` with random classifiers on every exit."""
    _, base = trained(variant)
    cfg = make_cfg(variant)
    cfg.exits.use_exit_classifier = True
    model = build(cfg, sharpen=1.0)
    missing, _ = model.load_state_dict(base.state_dict(), strict=False)
    assert all(".classifier." in n for n in missing) and missing
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exits.values():
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=gen))
            head.classifier.bias.fill_(0.5)
            if head.norm is not None:  # heads that disagree: a token from the wrong one shows
                head.norm.weight.mul_(torch.randn(head.norm.weight.shape, generator=gen).abs() * 2)
    return cfg, model.eval()


def reference(model, prompt, steps, tau, layers, L, allowed=None):
    """Greedy decoding, whole sequence recomputed each step, exit rule applied by hand."""
    seq, toks, out_layers, scores = list(prompt), [], [], []
    for i in range(steps):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq]), return_logits=True, return_exit_states=True)
        tok, layer, score = int(out.final_logits[-1, 0].argmax()), L, None
        if i > 0:  # the first token comes from the prefill's final head
            for k in layers:
                if allowed is not None and k not in allowed:
                    continue
                c = model.exits[str(k)].classifier
                z = float(out.exit_states[k][-1, 0].double() @ c.weight[0].double() + c.bias.double())
                s = 1.0 / (1.0 + torch.exp(torch.tensor(-z, dtype=torch.float64)).item())
                if s >= tau:
                    tok, layer, score = int(out.exit_logits[k][-1, 0].argmax()), k, s
                    break
        seq.append(tok)
        toks.append(tok)
        out_layers.append(layer)
        scores.append(score)
    return toks, out_layers, scores


@pytest.mark.parametrize("variant", ["llama", "llama-block", "llama-norm-mlp-pre"])
def test_classifier_exit_matches_no_cache_reference(variant, single_rank_parallel):
    cfg, model = with_classifiers(variant)
    L, layers = cfg.model.num_layers, list(cfg.exits.exit_layer_nums)
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(3), 3, cfg.model.vocab_size)
    exited = stayed = 0
    for tau, allowed, cap in ((0.7, None, 16), (0.5, layers[-1:], 2), (0.95, None, 16)):
        mode = EarlyExit(threshold=tau, exit_layers=allowed, max_pending=cap, confidence="classifier")
        for p, out in zip(prompts, engine.generate(prompts, 9, mode=mode)):
            toks, lays, scores = reference(model, p, 9, tau, layers, L, allowed)
            assert (out.tokens, out.exit_layers) == (toks, lays), (variant, tau, allowed, cap)
            for got, want in zip(out.confidences, scores):
                if want is not None:
                    assert abs(got - want) < 1e-9
            exited += sum(x < L for x in lays)
            stayed += sum(x == L for x in lays)
    assert exited > 0 and stayed > 0  # the rule both fired and declined


@pytest.mark.parametrize("fast", ["fused", "static"])
def test_classifier_exit_on_the_static_runners(fast, single_rank_parallel):
    """Batch 1 on the static (megatron layers) and fused CPU runners: same rule, same reference."""
    from megatron.early_exit.inference.static_early_exit import StaticRunner

    cfg, model = with_classifiers("llama-norm-mlp-pre", seed=2)
    L, layers = cfg.model.num_layers, list(cfg.exits.exit_layer_nums)
    engine = Engine(model, cfg, fast_decode=fast)
    prompts = random_prompts(torch.Generator().manual_seed(9), 3, cfg.model.vocab_size)
    exited = 0
    for tau, cap in ((0.6, 16), (0.3, 2)):
        mode = EarlyExit(threshold=tau, max_pending=cap, confidence="classifier")
        assert isinstance(engine.session(prompts[:1], 4, mode=mode).runner, StaticRunner)
        for p in prompts:
            (out,) = engine.generate([p], 12, mode=mode)
            toks, lays, scores = reference(model, p, 12, tau, layers, L)
            assert (out.tokens, out.exit_layers) == (toks, lays), (fast, tau, cap)
            assert all(abs(g - w) < 1e-9 for g, w in zip(out.confidences, scores) if w is not None)
            exited += sum(x < L for x in lays)
    assert exited > 5


def test_projection_runs_only_for_rows_that_leave(single_rank_parallel):
    cfg, model = with_classifiers("llama", seed=1)
    L = cfg.model.num_layers
    projected = []
    for head in model.exits.values():
        head.output_layer.register_forward_hook(
            lambda mod, args, out: projected.append(args[0].shape[:-1].numel()))
    prompts = random_prompts(torch.Generator().manual_seed(5), 4, cfg.model.vocab_size)
    outs = Engine(model, cfg).generate(prompts, 10, mode=EarlyExit(0.7, confidence="classifier"))
    left = sum(x < L for o in outs for x in o.exit_layers)
    assert left > 0 and sum(projected) == left  # one projected row per token that exited
    projected.clear()  # max-prob confidence pays every exit's projection for every open row
    outs = Engine(model, cfg).generate(prompts, 10, mode=EarlyExit(0.7))
    assert sum(projected) > sum(x < L for o in outs for x in o.exit_layers)


def test_classifier_needs_classifiers(single_rank_parallel):
    from megatron.early_exit.inference.requests import GenerationRequest, RequestError, validate_request

    cfg, model = trained("llama")
    with pytest.raises(ValueError, match="classifier"):
        Engine(model, cfg).generate([[1, 2]], 3, mode=EarlyExit(0.5, confidence="classifier"))
    with pytest.raises(RequestError) as e:
        validate_request(GenerationRequest(prompt=[1, 2], max_new_tokens=3,
                                           mode=EarlyExit(0.5, confidence="classifier")), cfg)
    assert e.value.field == "mode.confidence"


def test_fit_logistic_reaches_the_optimum_and_auc():
    from megatron.early_exit.inference.classifier_fit import auc, fit_logistic

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64) * torch.tensor([1, 2, 3, .5, 1, 4.])
    truth = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0, 0.1], dtype=torch.float64)
    y = torch.rand(400, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ truth - 0.3)
    l2 = 1e-2
    w, b = fit_logistic(x, y, l2=l2)
    # the objective is over standardised features: grad_w' = Z^T (p - y) / N + l2 w', w' = w * std
    std = x.std(0)
    p = torch.sigmoid(x @ w + b)
    grad_w = ((x - x.mean(0)) / std).T @ (p - y.double()) / len(y) + l2 * (w * std)
    grad_b = (p - y.double()).mean()
    assert grad_w.abs().max() < 1e-7 and abs(grad_b) < 1e-7
    s = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3, 0.9], dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.bool)
    pairs = [(a, c) for a in s[lab] for c in s[~lab]]
    want = sum(1.0 if a > c else 0.5 if a == c else 0.0 for a, c in pairs) / len(pairs)
    assert abs(auc(s, lab) - want) < 1e-12 and auc(s, torch.ones(6, dtype=torch.bool)) is None


def classifier_score(model, out, k):
    """sigmoid(h . w + b) of exit k at the last position, from the parameters by hand."""
    c = model.exits[str(k)].classifier
    z = out.exit_states[k][-1, 0].double() @ c.weight[0].double() + c.bias.double()
    return float(torch.sigmoid(z))


def test_fit_then_calibrate_tools(calibrated_ckpt, tmp_path, single_rank_parallel, capsys):  # noqa: F811
    from megatron.early_exit.checkpoint import load_full_state
    from megatron.early_exit.checkpoint.serving import serving_defaults
    from megatron.early_exit.cli import run_cli
    from megatron.early_exit.parallel.state import destroy_parallel

    ckpt, data = calibrated_ckpt
    fit, calib = tool("fit_exit_classifier"), tool("calibrate_threshold")
    out = str(tmp_path / "clf")
    assert fit.run_cli(fit.main, ["--load", ckpt, "--data", data, "--save-dir", out,
                                  "--window", "16", "--json", str(tmp_path / "fit.json")]) == 0
    _, before = load_full_state(ckpt)
    cfg_after, after = load_full_state(out)
    assert cfg_after["exits"]["use_exit_classifier"]
    assert set(after) - set(before) == {f"exits.{k}.classifier.{p}" for k in (2, 3)
                                        for p in ("weight", "bias")}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert calib.run_cli(calib.main, ["--load", out, "--data", data, "--confidence", "classifier",
                                      "--target-agreement", "0.8", "--json", str(tmp_path / "c.json"),
                                      "--write-default"]) == 0
    with open(tmp_path / "c.json") as f:
        chosen = json.load(f)["chosen"]
    measured = prefix_agreement(out, data, chosen["threshold"], chosen["exits"], classifier_score)
    assert measured >= 0.8 and abs(measured - chosen["agreement"]) < 1e-9, (measured, chosen)
    assert serving_defaults(out)["confidence"] == "classifier"
    gen = tool("generate")  # no mode flag: the calibrated default, kind included
    base = ["--load", out, "--prompt", "w1 w2 w3", "--tokens-to-generate", "8", "--json",
            "--device", "cpu"]
    calibrated = gen.main(base)
    destroy_parallel()
    explicit = gen.main(base + ["--early-exit-thres", str(chosen["threshold"]),
                                "--exit-layers", *map(str, chosen["exits"]),
                                "--confidence", "classifier"])
    destroy_parallel()
    assert "confidence classifier" in capsys.readouterr().err and calibrated == explicit
    for t, argv, flag in (
            (calib, ["--load", ckpt, "--data", data, "--confidence", "classifier",
                     "--target-agreement", "0.9"], "--confidence"),
            (fit, ["--load", ckpt, "--data", data, "--save-dir", out], "--save-dir"),
            (gen, ["--load", ckpt, "--prompt", "w1", "--tokens-to-generate", "4",
                   "--early-exit-thres", "0.5", "--confidence",
                   "classifier", "--device", "cpu"], "--confidence"),
            (gen, ["--load", out, "--prompt", "w1", "--confidence", "classifier"], "--confidence"),
            (fit, ["--load", ckpt, "--data", data, "--save-dir", str(tmp_path / "x"),
                   "--l2", "-1"], "--l2"),
            (fit, ["--load", ckpt, "--data", data, "--save-dir", str(tmp_path / "x"),
                   "--valid-fraction", "1"], "--valid-fraction")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(t.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {flag}"), (argv, err)
        destroy_parallel()


def test_classifiers_stay_frozen_in_training(single_rank_parallel):
    """No loss reaches a classifier, and exit tuning does not make it trainable."""
    from megatron.early_exit.trainer.tune import freeze_backbone

    cfg, model = with_classifiers("llama-norm-mlp-pre")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".classifier." in n)
    trainable = freeze_backbone([model])
    assert trainable and not any(".classifier." in n for n in trainable)
    assert any(".norm." in n for n in trainable)
