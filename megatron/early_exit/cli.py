"""What every entry point does with bad input: one line ``error: --flag: what is wrong``, exit 2.

Each entry script (``pretrain_early_exit_gpt.py``, ``tools/*.py``) ends with::

    from megatron.early_exit.cli import run_cli

    def main(argv=None):
        args = build_parser().parse_args(argv)
        ...

    if __name__ == "__main__":
        run_cli(main)

``run_cli(main, argv=None)`` calls ``main(argv)`` (``sys.argv[1:]`` when ``argv`` is None) and
turns an *input* error into exactly one line on stderr and exit code 2, as argparse does for a
malformed flag. Input errors are: ``UsageError`` (raise it with the flag to blame), and any
exception whose class (or a base) is named ``ConfigError``, ``CheckpointError``,
``RequestError`` or ``UsageError`` (matched by name, so this module imports none of them), and a
``ValueError`` whose message names a flag (``--top-p must be ...``). The flag is the first
``--flag`` in the message; when a message names a Python field instead (``top_p must be in
(0, 1]``, from a dataclass), the field becomes its flag (``--top-p``). Everything else is a bug
and keeps its traceback. ``--debug`` anywhere on the command line is removed before ``main``
sees it and shows the traceback of input errors too.

Under torchrun every rank usually fails the same way; only global rank 0 prints the line (the
others exit 2 quietly).

Flag checks shared by several tools live here too: ``check_requires(args, pairs)`` turns a
flag that would be silently ignored without its partner into a ``UsageError``; e.g.
tools/generate.py::

    check_requires(args, [("exit_layers", "early_exit_thres"), ("draft_exit", "self_speculative")])
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterable, Optional, Sequence, Tuple

INPUT_ERRORS = ("ConfigError", "CheckpointError", "RequestError", "UsageError")
_FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
_FIELD = re.compile(r"^([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b")  # snake_case with at least one "_"


class UsageError(ValueError):
    """A bad command-line input, blamed on ``flag`` (e.g. ``"--load"``)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


def blame(flag: str, error: BaseException) -> UsageError:
    """``error`` as a UsageError naming ``flag`` (for errors about a flag's value that do not
    name it, e.g. a CheckpointError about the directory given to ``--load``)."""
    return UsageError(flag, str(error))


def flag_of(message: str) -> Optional[str]:
    """The flag a message is about: its first ``--flag``, else a leading snake_case field."""
    match = _FLAG.search(message)
    if match:
        return match.group(0)
    match = _FIELD.match(message.strip())
    if match:
        return "--" + match.group(1).replace("_", "-")
    return None


def error_line(error: BaseException) -> str:
    """The one line printed for an input error: ``error: --flag: what is wrong``."""
    if isinstance(error, UsageError):
        flag, text = error.flag, " ".join(error.message.split())
    else:
        text = " ".join(str(error).split())  # one line, even for multi-line messages
        flag = flag_of(text)
        for lead in (flag, flag[2:].replace("-", "_")) if flag else ():
            if text.startswith(lead):  # "--top-p must be ..." / "top_p must be ..."
                text = text[len(lead):].lstrip(" :")
                break
    return f"error: {flag}: {text}" if flag else f"error: {text}"


def is_input_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & set(INPUT_ERRORS):
        return True
    return isinstance(error, ValueError) and _FLAG.search(str(error)) is not None


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def run_cli(main: Callable[[Sequence[str]], object], argv: Optional[Sequence[str]] = None):
    """Run ``main(argv)``; input errors -> one stderr line and ``SystemExit(2)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001 - sorted into input errors and bugs below
        if debug or not is_input_error(error):
            raise
        if _rank() == 0:
            print(error_line(error), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def given(args, dest: str) -> bool:
    """Whether flag ``dest`` was given: not None, not False, not an empty list."""
    value = getattr(args, dest, None)
    return value is not None and value is not False and value != []


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_requires(args, pairs: Iterable[Tuple[str, str]]) -> None:
    """For each (flag, needed) pair of argparse dests: ``flag`` given without ``needed`` would be
    ignored, so it is a UsageError naming ``flag``."""
    for dest, needed in pairs:
        if given(args, dest) and not given(args, needed):
            raise UsageError(flag_name(dest), f"has no effect without {flag_name(needed)}")
