"""Typed settings read once from environment variables (12-factor), validated at start.

Each service declares one frozen dataclass whose fields are made with `setting()`,
naming the variable, its default and what it means. `load_settings` reads the
environment once, converts each value to the field's type, checks its bounds and
raises `SettingsError` naming the variable and what to fix. `settings_reference`
lists every variable with its default and meaning, so documentation and the
deployment checks are generated from (or checked against) this one source.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from switchboard.common.tls import TlsError, TlsIdentity, load_tls_identity

T = TypeVar("T")

_ENV = "switchboard_env"
_DOC = "switchboard_doc"
_MIN = "switchboard_min"
_MAX = "switchboard_max"
_CHOICES = "switchboard_choices"


class SettingsError(ValueError):
    """A variable is missing or invalid; the message names it and says what to fix."""


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A settings field read from environment variable `env` (default used when unset)."""
    metadata = {_ENV: env, _DOC: doc, _MIN: minimum, _MAX: maximum, _CHOICES: tuple(choices or ())}
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"{env}: use an immutable default (tuple), not {type(default).__name__}")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """What every gRPC service has: where it listens, its metrics port, its drain period.

    Variables are prefixed by the service (GATEWAY_PORT, ROUTER_PORT, ...), so
    one environment can hold the settings of every service of a local stack.
    """

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    drain_seconds: float = 10.0
    log_level: str = "info"
    # Limits gRPC enforces before any handler (or interceptor that reads the
    # request) runs; `_LIMIT_FIELDS` below documents each.
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_send_message_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_concurrent_streams: int = 1024
    keepalive_time_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    keepalive_permit_without_calls: bool = True
    min_client_ping_interval_seconds: float = 10.0
    max_ping_strikes: int = 2
    # Tighter bounds than max_receive_message_bytes for the small methods, as "Service/Method=bytes"
    # pairs (`method_message_limits` reads them); checked before the request is decoded.
    max_method_message_bytes: tuple[str, ...] = (
        "Health/Check=4096",
        "Health/Watch=4096",
        "Health/List=4096",
        "ServerReflection/ServerReflectionInfo=16384",
    )
    # The variables' prefix (GATEWAY, ...), so an error can name the setting that sets a limit; not
    # a value of the settings, so two settings read under different prefixes still compare equal.
    env_prefix: str = field(default="", compare=False)
    # The process's identity on internal hops (SWITCHBOARD_TLS_*): mutual TLS when set, plaintext when None.
    tls: TlsIdentity | None = None


# The limit variables of every server: (attribute, env suffix, doc, bounds). A
# service chooses its own defaults with a `server_defaults` ClassVar on its
# settings class (a mapping attribute -> default); the rest come from
# ServerSettings. Internal services carry token ids (a Place or a generator
# request holds up to 131,072 of them, at most 5 bytes each), so their message
# limit is larger than the public gateway's, which is sized to its prompt limit.
_LIMIT_FIELDS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "max_receive_message_bytes",
        "MAX_RECEIVE_MESSAGE_BYTES",
        "largest request message accepted; gRPC refuses a larger one with RESOURCE_EXHAUSTED before any handler runs",
        {"minimum": 1024, "maximum": 1024**3},
    ),
    (
        "max_send_message_bytes",
        "MAX_SEND_MESSAGE_BYTES",
        "largest response message sent (a larger one fails the call with RESOURCE_EXHAUSTED)",
        {"minimum": 1024, "maximum": 1024**3},
    ),
    (
        "max_metadata_bytes",
        "MAX_METADATA_BYTES",
        "largest request metadata (headers) accepted, in bytes (grpc.max_metadata_size)",
        {"minimum": 1024, "maximum": 1024 * 1024},
    ),
    (
        "max_concurrent_streams",
        "MAX_CONCURRENT_STREAMS",
        "most concurrent calls on one client connection (HTTP/2 MAX_CONCURRENT_STREAMS; more wait in the client)",
        {"minimum": 1, "maximum": 1_000_000},
    ),
    (
        "keepalive_time_seconds",
        "KEEPALIVE_TIME_SECONDS",
        "interval of the server's keepalive pings on a connection",
        {"minimum": 1.0, "maximum": 86_400.0},
    ),
    (
        "keepalive_timeout_seconds",
        "KEEPALIVE_TIMEOUT_SECONDS",
        "how long the server waits for a ping's answer before closing the connection",
        {"minimum": 1.0, "maximum": 3600.0},
    ),
    (
        "keepalive_permit_without_calls",
        "KEEPALIVE_PERMIT_WITHOUT_CALLS",
        "keepalive pings (the server's and a client's) allowed on a connection with no call in flight",
        {},
    ),
    (
        "min_client_ping_interval_seconds",
        "MIN_CLIENT_PING_INTERVAL_SECONDS",
        "shortest interval between a client's pings without data; a faster ping is a strike",
        {"minimum": 1.0, "maximum": 86_400.0},
    ),
    (
        "max_ping_strikes",
        "MAX_PING_STRIKES",
        "ping strikes before the server closes the connection (GOAWAY too_many_pings; 0: unlimited)",
        {"minimum": 0, "maximum": 1000},
    ),
    (
        "max_method_message_bytes",
        "MAX_METHOD_MESSAGE_BYTES",
        "per-method request message bounds below MAX_RECEIVE_MESSAGE_BYTES, as Service/Method=bytes pairs: a larger "
        "message is refused with RESOURCE_EXHAUSTED (reason MESSAGE_TOO_LARGE) before it is decoded; pairs set here "
        "replace those methods' defaults, other methods keep theirs; unlisted methods: MAX_RECEIVE_MESSAGE_BYTES",
        {},
    ),
)

# The smallest per-method bound: an empty message is 0 bytes, so anything above is a choice; below
# this an operator has almost certainly mistyped.
MIN_METHOD_MESSAGE_BYTES = 16


def parse_method_limits(variable: str, pairs: Sequence[str]) -> dict[str, int]:
    """`Service/Method=bytes` pairs as {"Service/Method": bytes}; SettingsError naming `variable`."""
    limits: dict[str, int] = {}
    for pair in pairs:
        method, sep, raw = pair.partition("=")
        method = method.strip()
        service, slash, name = method.partition("/")
        if not sep or not slash or not service or not name or "/" in name:
            raise SettingsError(f"{variable}: expected Service/Method=bytes (e.g. Health/Check=4096), got {pair!r}")
        try:
            limit = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{variable}: {method}: expected a number of bytes, got {raw.strip()!r}") from None
        if limit < MIN_METHOD_MESSAGE_BYTES:
            raise SettingsError(f"{variable}: {method}: must be >= {MIN_METHOD_MESSAGE_BYTES} bytes, got {limit}")
        limits[method] = limit
    return limits


def merge_method_limits(variable: str, defaults: Sequence[str], chosen: Sequence[str]) -> tuple[str, ...]:
    """`defaults` with the methods in `chosen` replaced (or added), as pairs in a stable order."""
    merged = parse_method_limits(variable, defaults)
    merged.update(parse_method_limits(variable, chosen))
    return tuple(f"{method}={limit}" for method, limit in merged.items())


def method_message_limits(settings: ServerSettings) -> dict[str, int]:
    """The per-method bounds of one server ({"Service/Method": bytes}), each at most its message limit.

    A default bound above max_receive_message_bytes is moot (gRPC refuses the message first), so
    it is capped rather than refused: lowering the server's limit needs no per-method edit.
    """
    variable = f"{settings.env_prefix}_MAX_METHOD_MESSAGE_BYTES" if settings.env_prefix else "MAX_METHOD_MESSAGE_BYTES"
    limits = parse_method_limits(variable, settings.max_method_message_bytes)
    return {method: min(limit, settings.max_receive_message_bytes) for method, limit in limits.items()}


@dataclass(frozen=True)
class SettingDoc:
    """One documented variable."""

    env: str
    default: str
    doc: str


LOG_LEVELS = ("debug", "info", "warning", "error")


def _server_fields(
    prefix: str, default_port: int, default_metrics_port: int, defaults: Mapping[str, Any] | None = None
) -> list[tuple[str, str, Any, str, dict[str, Any]]]:
    """(attribute, env, default, doc, bounds) of the ServerSettings variables for one service.

    `defaults` overrides the limit defaults of ServerSettings (the service's `server_defaults`).
    """
    chosen = dict(defaults or {})
    unknown = set(chosen) - {attr for attr, *_ in _LIMIT_FIELDS}
    if unknown:
        raise TypeError(f"server_defaults names no server limit: {', '.join(sorted(unknown))}")
    plain = ServerSettings()
    # A service's per-method bounds add to (and may replace) the shared ones for health and reflection.
    chosen["max_method_message_bytes"] = merge_method_limits(
        f"{prefix}_MAX_METHOD_MESSAGE_BYTES", plain.max_method_message_bytes, chosen.get("max_method_message_bytes", ())
    )
    limits = [
        (attr, f"{prefix}_{suffix}", chosen.get(attr, getattr(plain, attr)), doc, bounds)
        for attr, suffix, doc, bounds in _LIMIT_FIELDS
    ]
    return [
        ("host", f"{prefix}_HOST", "127.0.0.1", "address to listen on (0.0.0.0 in containers)", {}),
        ("port", f"{prefix}_PORT", default_port, "gRPC port (0 picks a free port)", {"minimum": 0, "maximum": 65535}),
        (
            "metrics_port",
            f"{prefix}_METRICS_PORT",
            default_metrics_port,
            "Prometheus metrics HTTP port (0 disables)",
            {"minimum": 0, "maximum": 65535},
        ),
        (
            "drain_seconds",
            f"{prefix}_DRAIN_SECONDS",
            10.0,
            "grace period for in-flight work on SIGTERM",
            {"minimum": 0.0, "maximum": 3600.0},
        ),
        ("log_level", "LOG_LEVEL", "info", "log level: " + ", ".join(LOG_LEVELS), {"choices": LOG_LEVELS}),
        *limits,
    ]


def _parse(env: str, raw: str, kind: Any) -> Any:
    """Convert one raw string to `kind`, or raise SettingsError naming the variable."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(env, raw, options[0])
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        return tuple(_parse(env, part.strip(), inner) for part in raw.split(",") if part.strip())
    if origin is typing.Literal:
        return raw
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true/false")
        if kind is int:
            return int(raw.strip())
        if kind is float:
            return float(raw.strip())
        if kind is Path:
            return Path(raw.strip()).expanduser()
        return raw
    except ValueError as exc:
        name = getattr(kind, "__name__", str(kind))
        raise SettingsError(f"{env}: expected {name}, got {raw!r} ({exc})") from None


def _check(env: str, value: Any, minimum: float | None, maximum: float | None, choices: Sequence[str]) -> None:
    """Bounds and choices of one value; SettingsError names the variable."""
    if choices and value not in choices:
        raise SettingsError(f"{env}: must be one of {', '.join(choices)}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if minimum is not None and value < minimum:
            raise SettingsError(f"{env}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{env}: must be <= {maximum}, got {value}")


def _read(env: str, default: Any, kind: Any, environ: Mapping[str, str], bounds: dict[str, Any]) -> Any:
    raw = environ.get(env)
    value = default if raw is None or (raw == "" and kind is not str) else _parse(env, raw, kind)
    if bounds.get("choices") and isinstance(value, str):
        value = value.lower()  # choices are lower-case words; accept INFO as well as info
    _check(env, value, bounds.get("minimum"), bounds.get("maximum"), bounds.get("choices", ()))
    return value


def load_server_settings(
    prefix: str,
    default_port: int,
    default_metrics_port: int,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> ServerSettings:
    """ServerSettings of one service from `{prefix}_HOST`, `{prefix}_PORT`, ... and LOG_LEVEL.

    `defaults` are the service's own limit defaults (attribute -> value), e.g. a smaller
    max_receive_message_bytes for a public front.
    """
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(ServerSettings)
    described = _server_fields(prefix, default_port, default_metrics_port, defaults)
    values = {attr: _read(name, default, hints[attr], env, bounds) for attr, name, default, _, bounds in described}
    # Pairs the operator sets replace only those methods' bounds; the rest keep the service's defaults.
    variable = f"{prefix}_MAX_METHOD_MESSAGE_BYTES"
    default_pairs = next(default for attr, _, default, _, _ in described if attr == "max_method_message_bytes")
    chosen_pairs = values["max_method_message_bytes"] if env.get(variable, "").strip() else ()
    for method, limit in parse_method_limits(variable, chosen_pairs).items():
        if limit > values["max_receive_message_bytes"]:
            raise SettingsError(
                f"{variable}: {method}={limit} is over {prefix}_MAX_RECEIVE_MESSAGE_BYTES "
                f"({values['max_receive_message_bytes']}), which gRPC applies first; raise that too"
            )
    values["max_method_message_bytes"] = merge_method_limits(variable, default_pairs, chosen_pairs)
    values["env_prefix"] = prefix
    try:
        values["tls"] = load_tls_identity(env)
    except TlsError as exc:
        raise SettingsError(str(exc)) from None
    return ServerSettings(**values)


def server_defaults(cls: type) -> Mapping[str, Any]:
    """The server limit defaults a settings class chooses (its `server_defaults` ClassVar; {} if none)."""
    return dict(getattr(cls, "server_defaults", None) or {})


def load_settings(
    cls: type[T],
    *,
    server_prefix: str | None = None,
    default_port: int = 0,
    default_metrics_port: int = 0,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Read `cls` from the environment; a `server: ServerSettings` field is filled from `server_prefix`."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hints[f.name] is ServerSettings:
            if server_prefix is None:
                raise TypeError(f"{cls.__name__}.{f.name} needs server_prefix")
            values[f.name] = load_server_settings(server_prefix, default_port, default_metrics_port, env, server_defaults(cls))
            continue
        name = f.metadata.get(_ENV)
        if name is None:
            continue
        bounds = {"minimum": f.metadata[_MIN], "maximum": f.metadata[_MAX], "choices": f.metadata[_CHOICES]}
        values[f.name] = _read(name, f.default, hints[f.name], env, bounds)
    return cls(**values)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def settings_reference(
    cls: type, *, server_prefix: str | None = None, default_port: int = 0, default_metrics_port: int = 0
) -> list[SettingDoc]:
    """Every variable `cls` reads, with its default and meaning, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs: list[SettingDoc] = []
    for f in dataclasses.fields(cls):
        if hints[f.name] is ServerSettings and server_prefix is not None:
            docs.extend(
                SettingDoc(name, _show(default), doc)
                for _, name, default, doc, _ in _server_fields(
                    server_prefix, default_port, default_metrics_port, server_defaults(cls)
                )
            )
        elif _ENV in f.metadata:
            docs.append(SettingDoc(f.metadata[_ENV], _show(f.default), f.metadata[_DOC]))
    return docs


def reference_markdown(docs: Sequence[SettingDoc]) -> str:
    """A Markdown table of variables (for service READMEs)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{d.env}` | `{d.default}` | {d.doc} |" for d in docs]
    return "\n".join(lines)


def parse_expert_folders(variable: str, pairs: tuple[str, ...]) -> dict[str, Path]:
    """`expert=folder` pairs (a model-folders setting) as {expert: folder}; SettingsError naming `variable`."""
    out: dict[str, Path] = {}
    for pair in pairs:
        expert, sep, folder = pair.partition("=")
        if not sep or not expert.strip() or not folder.strip():
            raise SettingsError(f"{variable}: expected expert=folder, got {pair!r}")
        out[expert.strip()] = Path(folder.strip()).expanduser()
    return out
