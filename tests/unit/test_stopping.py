"""Unit tests for megatron.early_exit.inference.stopping with toy tokenizers.

Run: python -m pytest -q tests/unit/test_stopping.py
"""

import random

import pytest
import torch

from megatron.early_exit.inference.stopping import StopChecker, StopCriteria

# -- toy tokenizers ---------------------------------------------------------------------------

PIECES = ["a", "b", "c", "ab", "bc", "Us", "er", ":", "\n", " ", "x", "yz", "END", "e", "r"]


def piece_decode(ids):
    """Plain concatenation of string pieces."""
    return "".join(PIECES[i] for i in ids)


SP_PIECES = ["\u2581User", ":", "\u2581the", "\u2581cat", "s", "\u2581", "a", "\u2581Us", "er", "."]


def sp_decode(ids):
    """SentencePiece-like: U+2581 is a space and a decode drops its leading space."""
    text = "".join(SP_PIECES[i] for i in ids).replace("\u2581", " ")
    return text[1:] if text.startswith(" ") else text


BYTE_WORDS = ["a", "b", " ", "\u00e9", "\u20ac", "\U0001F600", "x"]  # 1 to 4 UTF-8 bytes
BYTE_PIECES = sorted({bytes([c]) for w in BYTE_WORDS for c in w.encode()})


def byte_decode(ids):
    """Byte-level: one byte per token, partial UTF-8 shown as U+FFFD."""
    return b"".join(BYTE_PIECES[i] for i in ids).decode("utf-8", errors="replace")


def byte_encode(text):
    return [BYTE_PIECES.index(bytes([c])) for c in text.encode()]


def reference(ids, crit, decode):
    """Brute force: full decode after every token -> (reason, num_tokens, text_len, matched)."""
    for t in range(1, len(ids) + 1):
        if ids[t - 1] in crit.stop_token_ids:
            return "stop", t - 1, len(decode(ids[: t - 1])), ids[t - 1]
        text = decode(ids[:t])
        hits = [(text.find(s) + len(s), text.find(s), s) for s in crit.stop_strings if s in text]
        if hits:
            _, start, s = min(hits)
            return "stop", t, start, s
        if crit.max_new_tokens is not None and t == crit.max_new_tokens:
            return "length", t, len(text), None
    return None, len(ids), None, None


def run_checker(ids, crit, decode, chunks, **kw):
    checker = StopChecker(crit, decode, **kw)
    pos = 0
    while pos < len(ids):
        n = chunks(pos)
        res = checker.feed(ids[pos : pos + n])
        pos += n
        if res.stopped:
            return res.finish_reason, res.num_tokens, res.text_len, res.matched
    return None, checker.num_generated, None, None


# -- direct cases -----------------------------------------------------------------------------


def test_criteria_validation():
    with pytest.raises(ValueError, match="stop_strings"):
        StopCriteria(stop_strings=("",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopCriteria(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        StopCriteria(stop_token_ids={"x"})
    with pytest.raises(ValueError, match="detokenize"):
        StopChecker(StopCriteria(stop_strings=("a",)))
    crit = StopCriteria(stop_token_ids=[3, 4], stop_strings=["ab"])
    assert crit.stop_token_ids == frozenset({3, 4}) and crit.stop_strings == ("ab",)


def test_stop_string_spanning_tokens():
    # "Us" + "er" + ":" spells "User:" across three tokens
    crit = StopCriteria(stop_strings=("User:",))
    ids = [0, 8, 5, 6, 7, 10]  # a \n Us er : x
    checker = StopChecker(crit, piece_decode)
    results = [checker.feed(i) for i in ids[:5]]
    assert [r.stopped for r in results] == [False] * 4 + [True]
    assert [r.holdback_chars for r in results[:4]] == [0, 0, 2, 4]  # "Us", "User" held back
    res = results[-1]
    assert (res.finish_reason, res.num_tokens, res.matched) == ("stop", 5, "User:")
    assert piece_decode(ids[: res.num_tokens])[: res.text_len] == "a\n"
    with pytest.raises(RuntimeError):
        checker.feed(10)


def test_stop_string_inside_one_token_keeps_prefix():
    checker = StopChecker(StopCriteria(stop_strings=("b",)), piece_decode)
    res = checker.feed([0, 3, 10])  # a ab x: "b" completes inside "ab", "x" is dropped
    assert (res.stopped, res.num_tokens, res.text_len) == (True, 2, 2)


def test_multiple_tokens_at_once_equals_one_at_a_time():
    crit = StopCriteria(stop_strings=("bc", "abcx"), max_new_tokens=50)
    ids = [0, 1, 2, 10, 12]  # a b c x END: "bc" completes at "c", before "abcx" would
    one = run_checker(ids, crit, piece_decode, lambda pos: 1)
    many = run_checker(ids, crit, piece_decode, lambda pos: 5)
    assert one == many == reference(ids, crit, piece_decode) == ("stop", 3, 1, "bc")


def test_stop_token_id_excluded():
    crit = StopCriteria(stop_token_ids={12}, max_new_tokens=10)
    checker = StopChecker(crit, piece_decode)
    assert not checker.feed(0).stopped
    res = checker.feed(torch.tensor([1, 12, 2]))  # tokens after the stop token are ignored
    assert (res.finish_reason, res.num_tokens, res.text_len, res.matched) == ("stop", 2, 2, 12)
    # without a detokenize callable stop ids still work, text_len is unknown
    res = StopChecker(crit).feed([3, 12])
    assert (res.finish_reason, res.num_tokens, res.text_len) == ("stop", 1, None)


def test_stop_string_before_stop_token_in_same_feed_wins():
    crit = StopCriteria(stop_token_ids={12}, stop_strings=("ab",))
    res = StopChecker(crit, piece_decode).feed([0, 1, 12])
    assert (res.matched, res.num_tokens, res.text_len) == ("ab", 2, 0)


def test_max_new_tokens():
    crit = StopCriteria(stop_token_ids={12}, max_new_tokens=3)
    checker = StopChecker(crit, piece_decode)
    assert not checker.feed([0, 1]).stopped
    res = checker.feed([3, 4, 5])  # only the first of these fits
    assert (res.finish_reason, res.num_tokens, res.text_len, res.matched) == ("length", 3, 4, None)
    # a stop token on the last allowed token is a stop, not a length finish
    res = StopChecker(crit, piece_decode).feed([0, 1, 12])
    assert (res.finish_reason, res.num_tokens) == ("stop", 2)
    # a stop token beyond the limit is never seen
    res = StopChecker(crit, piece_decode).feed([0, 1, 2, 12])
    assert (res.finish_reason, res.num_tokens) == ("length", 3)


def test_byte_level_multibyte_stop_string():
    crit = StopCriteria(stop_strings=("\u20acx",))
    ids = byte_encode("ab\u00e9 \u20acx\U0001F600")
    for chunk in (1, 2, 3, len(ids)):
        got = run_checker(ids, crit, byte_decode, lambda pos: chunk)
        assert got == reference(ids, crit, byte_decode) == ("stop", 9, 4, "\u20acx")


# -- randomized comparison with the brute-force reference --------------------------------------


def _random_case(rng, kind):
    if kind == "piece":
        ids = [rng.randrange(len(PIECES)) for _ in range(rng.randrange(1, 300))]
        stops = rng.sample(["User:", "bc", "cab", "zEN", "xyzx", "\nUs", "ENDa"], rng.randrange(0, 3))
        return ids, stops, piece_decode
    if kind == "sp":
        ids = [rng.randrange(len(SP_PIECES)) for _ in range(rng.randrange(1, 300))]
        stops = rng.sample([" User:", "cats.", " the cat", "User", "a."], rng.randrange(0, 3))
        return ids, stops, sp_decode
    words = [rng.choice(BYTE_WORDS) for _ in range(rng.randrange(1, 150))]
    stops = rng.sample(["\u20acx", "\u00e9\U0001F600", "b \u00e9", "aa\u20ac"], rng.randrange(0, 3))
    return byte_encode("".join(words)), stops, byte_decode


@pytest.mark.parametrize("kind", ["piece", "sp", "byte"])
def test_random_sequences_match_reference(kind):
    rng = random.Random(kind)
    outcomes = set()
    for _ in range(150):
        ids, stops, decode = _random_case(rng, kind)
        crit = StopCriteria(
            stop_token_ids=set(rng.sample(range(8), rng.randrange(0, 2))),
            stop_strings=tuple(stops),
            max_new_tokens=rng.choice([None, 5, 40, 250]),
        )
        want = reference(ids, crit, decode)
        outcomes.add(want[0] if want[0] != "stop" else type(want[3]).__name__)
        sizes = [1, 2, 3, 5]
        got = run_checker(ids, crit, decode, lambda pos: rng.choice(sizes))
        assert got == want, (ids, crit)
    assert outcomes == {None, "length", "int", "str"}  # every kind of ending was exercised


def test_decodes_only_a_tail_window():
    """Per-step decode cost is bounded by the window, not by the sequence length."""
    lengths = []

    def counting_decode(ids):
        lengths.append(len(ids))
        return piece_decode(ids)

    crit = StopCriteria(stop_strings=("never",))  # window = 4 * 5 + 8 = 28 tokens
    checker = StopChecker(crit, counting_decode)
    rng = random.Random(0)
    for _ in range(2000):
        assert not checker.feed(rng.randrange(len(PIECES))).stopped
    assert max(lengths) <= 2 * 28 + 1
    assert len(lengths) < 2000 * 1.1  # about one decode per step
