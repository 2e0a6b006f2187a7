"""Chat messages to prompts: the default template, a model folder's template exactly as transformers renders it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from switchboard.gateway.chat import ChatError, ChatTemplates, normalize_messages
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

# A template in the style of Llama 3's: header tokens per turn, BOS first, a generation prompt.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are Hamlet."},
    {"role": "user", "content": "  To be?  "},
    {"role": "assistant", "content": "Or not."},
    {"role": "user", "content": "Well?"},
]


def model_folder(tmp_path: Path, template: str | list[dict[str, str]] | None) -> Path:
    config: dict[str, object] = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_default_template_writes_role_lines_and_the_assistant_turn() -> None:
    prompt = ChatTemplates({}).render(normalize_messages(MESSAGES[:2]))
    assert prompt == "system: You are Hamlet.\nuser:   To be?  \nassistant:"


def test_a_folder_template_renders_as_transformers_does(tmp_path: Path) -> None:
    templates = ChatTemplates({"bard": model_folder(tmp_path, LLAMA3_STYLE)})
    assert templates.has_template("bard") and not templates.has_template("other")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    tokenizer.chat_template = LLAMA3_STYLE
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert templates.render(normalize_messages(MESSAGES), "bard") == expected
    # Another expert, or the router's choice: the default template.
    assert templates.render(normalize_messages(MESSAGES[:1]), "other") == "system: You are Hamlet.\nassistant:"


def test_named_templates_use_the_default_one(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D{{ messages | length }}"}])
    assert ChatTemplates({"x": folder}).render(normalize_messages(MESSAGES), "x") == "D4"


@pytest.mark.parametrize(
    ("tokenizer_files", "strips"),
    [
        ({"tokenizer_config.json": {"add_bos_token": True}}, True),
        ({"tokenizer_config.json": {"add_bos_token": False}}, False),
        (
            {
                "tokenizer.json": {
                    "post_processor": {
                        "type": "Sequence",
                        "processors": [
                            {"type": "ByteLevel"},
                            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>"}}, {"Sequence": {"id": "A"}}]},
                        ],
                    }
                }
            },
            True,
        ),
        ({}, False),
    ],
)
def test_the_templates_bos_is_dropped_when_the_tokenizer_adds_its_own(
    tmp_path: Path, tokenizer_files: dict[str, dict[str, object]], strips: bool
) -> None:
    model_folder(tmp_path, LLAMA3_STYLE)
    for name, extra in tokenizer_files.items():
        path = tmp_path / name
        current = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**current, **extra}))
    prompt = ChatTemplates({"bard": tmp_path}).render(normalize_messages(MESSAGES[:1]), "bard")
    assert prompt.startswith("<|begin_of_text|>") is not strips
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_that_refuses_the_messages_names_them(tmp_path: Path) -> None:
    templates = ChatTemplates({"bard": model_folder(tmp_path, LLAMA3_STYLE)})
    with pytest.raises(ChatError) as error:
        templates.render([{"role": "tool", "content": "x"}], "bard")
    assert error.value.field == "messages" and "unknown role" in error.value.message


def test_a_broken_or_missing_template_falls_back_to_the_default(tmp_path: Path) -> None:
    broken = model_folder(tmp_path, "{% for %}")
    assert not ChatTemplates({"x": broken, "y": tmp_path / "absent"}).has_template("x")
    none = tmp_path / "n"
    none.mkdir()
    assert not ChatTemplates({"z": model_folder(none, None)}).has_template("z")


def test_the_sandbox_refuses_unsafe_templates(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatError):
        ChatTemplates({"x": folder}).render(normalize_messages(MESSAGES), "x")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 7}], "messages[0].content"),
        (["not an object"], "messages[0]"),
        ([{"role": "user", "content": "x"}] * 257, "messages"),
    ],
)
def test_bad_messages_name_the_field(messages: object, field: str) -> None:
    with pytest.raises(ChatError) as error:
        normalize_messages(messages)
    assert error.value.field == field


def test_text_parts_are_joined_and_an_assistant_may_have_no_content() -> None:
    messages = normalize_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": None}]
    )
    assert messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]
