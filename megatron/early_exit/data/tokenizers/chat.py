"""Chat templates: render a list of chat messages into a prompt string, the way HF does.

A checkpoint imported from Hugging Face carries ``tokenizer_config.json`` beside its tokenizer
files; its ``chat_template`` (a Jinja2 template, HF format; or ``chat_template.jinja``) turns
messages into text::

    template = ChatTemplate.from_directory(tokenizer_dir)      # None when there is none
    text = template.render([{"role": "user", "content": "Hi"}])   # ends with the assistant cue
    ids = tokenizer.tokenize(text)
    template.end_of_turn_ids(tokenizer)       # {id of eos_token}: where a reply ends

Templates run in Jinja2's immutable sandbox (a template is data from a checkpoint, not code we
trust) with the names HF templates use: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` (and the other ``*_token`` entries of the config), ``raise_exception(msg)`` and
``strftime_now(fmt)``; ``trim_blocks`` / ``lstrip_blocks`` as in transformers.

Run the tests: ``python -m pytest -q tests/server/test_chat_template.py``.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import List, Optional

__all__ = ["ChatTemplate", "ChatTemplateError", "CONFIG_FILE"]

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"  # where transformers >= 4.43 may keep the template instead


class ChatTemplateError(ValueError):
    """The template refused the messages (``raise_exception``) or failed to render."""


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """One compiled chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None):
        from jinja2 import StrictUndefined  # noqa: F401 - imported to fail early without jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat_template must be a non-empty string")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                  indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)

    @classmethod
    def from_config(cls, config: dict) -> Optional["ChatTemplate"]:
        """From a parsed tokenizer_config.json; None when it has no chat_template."""
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            return None
        tokens = {k: _token_text(v) for k, v in config.items() if k.endswith("_token")}
        return cls(source, {k: v for k, v in tokens.items() if v is not None})

    @classmethod
    def from_directory(cls, directory: str) -> Optional["ChatTemplate"]:
        """From ``directory/tokenizer_config.json`` (its ``chat_template``, else the file
        ``chat_template.jinja`` beside it, with the config's special tokens); None when neither
        holds a template."""
        path = os.path.join(directory, CONFIG_FILE)
        config = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError(f"{path}: expected a JSON object")
        jinja = os.path.join(directory, JINJA_FILE)
        if not config.get("chat_template") and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                config = dict(config, chat_template=f.read())
        return cls.from_config(config)

    def end_of_turn_ids(self, tokenizer) -> frozenset:
        """The id of the template's ``eos_token`` (e.g. ``<|im_end|>``) when it is one token of
        ``tokenizer``: a chat reply ends there, which need not be the tokenizer's eod."""
        text = self.special_tokens.get("eos_token")
        ids = tokenizer.tokenize(text) if text else []
        return frozenset(ids) if len(ids) == 1 else frozenset()

    def render(self, messages: List[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{role, content}]), ending with the assistant cue."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


def _raise(message):
    raise ChatTemplateError(str(message))
