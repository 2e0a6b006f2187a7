"""Chat messages to a prompt: the model folder's chat template when it has one, else a plain default.

A chat request is routed like any prompt, so its messages become text at the gateway. When the
request names an expert whose model folder (GATEWAY_MODEL_FOLDERS) has a `chat_template` in its
`tokenizer_config.json`, that template renders the messages exactly as transformers'
`apply_chat_template` would (a sandboxed Jinja environment with the same options, the folder's BOS
and EOS tokens, `add_generation_prompt=True`). The prompt text is tokenized later with special tokens
(by the router, or the replica); when that tokenizer adds BOS itself (`add_bos_token`, or BOS in
`tokenizer.json`'s post-processor, as Llama's do) the template's leading BOS is dropped from the text,
so the ids are the ones `apply_chat_template(tokenize=True)` makes: one BOS, not two. Otherwise, and for requests the router places, the
default template writes one `role: content` line per message and ends with `assistant:`, which the
demo experts (plain language models) continue sensibly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from switchboard.common.logging import get_logger

log = get_logger(__name__)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_MESSAGES = 256
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatError(Exception):
    """A chat request that cannot become a prompt; `field` is the JSON path of the bad value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    # The options transformers uses for chat templates, so a template renders the same text here.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return environment


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken-style {content: ...}."""
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _tokenizer_adds_bos(folder: Path, bos: str) -> bool:
    """Whether encoding text with special tokens adds `bos` (tokenizer_config's add_bos_token, else tokenizer.json)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config.get("add_bos_token"), bool):
        return bool(config["add_bos_token"])
    try:
        processor = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError, AttributeError):
        return False
    processors = processor.get("processors", [processor]) if isinstance(processor, Mapping) else []
    for step in processors:
        if isinstance(step, Mapping) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return any(isinstance(p, Mapping) and p.get("SpecialToken", {}).get("id") == bos for p in single)
    return False


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """Check OpenAI chat messages; return [{role, content}] with text parts joined. ChatError names the bad one."""
    if not isinstance(raw, list) or not raw:
        raise ChatError("messages", "must be a non-empty list of {role, content}")
    if len(raw) > MAX_MESSAGES:
        raise ChatError("messages", f"at most {MAX_MESSAGES} messages, got {len(raw)}")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ChatError(where, "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatError(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is served here
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatError(f"{where}.content[{part_index}]", "only {type: text, text: ...} parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"{where}.content", "must be a string or a list of text parts")
        messages.append({"role": str(role), "content": content})
    return messages


class ChatTemplates:
    """Compiled chat templates of the experts whose model folders have one."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        self._environment = _environment()
        self._default = self._environment.from_string(DEFAULT_TEMPLATE)
        self._templates: dict[str, tuple[jinja2.Template, str, str]] = {}
        self._strip_bos: dict[str, bool] = {}
        for expert, folder in folders.items():
            loaded = self._load(folder / "tokenizer_config.json")
            if loaded is not None:
                self._templates[expert] = loaded
                self._strip_bos[expert] = bool(loaded[1]) and _tokenizer_adds_bos(folder, loaded[1])
                log.info("chat template loaded", expert=expert, tokenizer_adds_bos=self._strip_bos[expert])

    def _load(self, path: Path) -> tuple[jinja2.Template, str, str] | None:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the tokenizer config; the default chat template is used", path=str(path), error=str(exc))
            return None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            return None
        try:
            compiled = self._environment.from_string(template)
        except jinja2.TemplateError as exc:
            log.warning("the chat template does not compile; the default is used", path=str(path), error=str(exc))
            return None
        return compiled, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))

    def has_template(self, expert: str) -> bool:
        """Whether the expert's own chat template renders its requests."""
        return expert in self._templates

    def render(self, messages: Sequence[Mapping[str, str]], expert: str = "") -> str:
        """The prompt for `messages`: the expert's template if it has one, else the default."""
        template, bos, eos = self._templates.get(expert, (self._default, "", ""))
        try:
            text = template.render(messages=list(messages), add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except jinja2.TemplateError as exc:
            # A template's raise_exception (e.g. "roles must alternate") describes the request.
            raise ChatError("messages", f"the model's chat template refused the messages: {exc}") from None
        if self._strip_bos.get(expert) and text.startswith(bos):
            text = text[len(bos) :]
        return text
