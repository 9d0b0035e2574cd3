"""Plain text (by default the Shakespeare corpus) -> JSON-lines documents for preprocessing.

    from megatron.early_exit.data.jsonl import shakespeare_documents, write_jsonl
    write_jsonl(shakespeare_documents(unit="paragraph", works=["hamlet"]), "hamlet.jsonl")

or from a shell (the tool parses the flags): ``python tools/text_to_jsonl.py --output x.jsonl``.
Each document is ``{"text": ..., "source": <work or file name>}``. ``unit="work"`` gives one
document per work (or file); ``unit="paragraph"`` cuts at blank lines and joins consecutive
blocks until each document has at least ``min_chars`` characters (a play's blocks are single
speeches, often a few words), so documents keep some context.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Mapping, Optional

UNITS = ("work", "paragraph")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def paragraph_blocks(text: str, min_chars: int = 0) -> list[str]:
    """Blank-line-separated blocks of ``text``, joined (by a blank line) until each holds at
    least ``min_chars`` characters; a short remainder joins the last block."""
    blocks = [b.strip("\n") for b in _BLANK_LINES.split(text.replace("\r\n", "\n"))]
    out: list[str] = []
    current: list[str] = []
    for block in (b for b in blocks if b.strip()):
        current.append(block)
        if sum(map(len, current)) >= min_chars:
            out.append("\n\n".join(current))
            current = []
    if current:
        if out:
            out[-1] = "\n\n".join([out[-1], *current])
        else:
            out.append("\n\n".join(current))
    return out


def text_documents(texts: Mapping[str, str], unit: str = "work",
                   min_chars: int = 500) -> Iterator[dict]:
    """Documents from ``{source name: text}``, in the mapping's order."""
    if unit not in UNITS:
        raise ValueError(f"--unit must be one of {UNITS}, got {unit!r}")
    for source, text in texts.items():
        text = text.replace("\r\n", "\n")
        parts = [text.strip("\n")] if unit == "work" else paragraph_blocks(text, min_chars)
        for part in parts:
            if part.strip():
                yield {"text": part, "source": source}


def shakespeare_documents(unit: str = "work", works: Optional[Iterable[str]] = None,
                          min_chars: int = 500, max_docs: Optional[int] = None) -> list[dict]:
    """The Shakespeare corpus (``data/corpus.py``) as documents, works in name order."""
    from .corpus import shakespeare_text_files

    files = shakespeare_text_files()
    names = list(files) if works is None else list(works)
    unknown = [n for n in names if n not in files]
    if unknown:
        raise KeyError(f"unknown works {unknown}; available: {sorted(files)}")
    texts = {n: files[n].read_text(encoding="utf-8", errors="replace") for n in names}
    docs = list(text_documents(texts, unit, min_chars))
    return docs if max_docs is None else docs[:max_docs]


def write_jsonl(documents: Iterable[dict], path: str) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); returns the number written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_text_files(paths: Iterable[str]) -> dict:
    """File name -> text (undecodable bytes replaced) for ``text_documents``."""
    texts = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts[os.path.basename(path)] = f.read()
    return texts
