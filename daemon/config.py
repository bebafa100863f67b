"""The daemon's one typed configuration, merged from CLI flags, environment, a YAML file and defaults.

Precedence: command line > ``LIVELM_<FIELD>`` environment variables > YAML file > defaults.
Every value is checked; a bad one raises ``ConfigError`` naming the field, the value, where it
came from and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from livelm.daemon.model.presets import PRESET_PREFIX
from livelm.protocol.errors import ConfigError

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "LIVELM_"
MIB = 1 << 20


class Config(msgspec.Struct, frozen=True, kw_only=True):
    model: str = "demo"  # a Hugging Face folder, random:NAME, or demo
    host: str = "127.0.0.1"
    port: int = 8080  # HTTP and WebSocket; 0 = any free port
    tcp_port: int = 8081  # framed MessagePack; 0 = any free port
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    cache_dir: str = ""  # empty = $LIVELM_HOME or ~/.cache/livelm
    journal_dir: str = ""  # sessions' entries on disk, restored at start; empty = off
    log_level: str = "info"
    log_format: str = "json"  # json | text
    # each line starts with <N>, its syslog priority, which journald reads (SyslogLevelPrefix=)
    log_syslog_prefix: bool = False
    block_size: int = 64  # tokens per KV block (64 lets prefill load key tiles by TMA on Hopper)
    kv_cache_tokens: int = 0  # 0 = size the pool from kv_memory_fraction
    kv_memory_fraction: float = 0.85
    max_batch_tokens: int = 2048
    max_sessions: int = 1024
    max_context_tokens: int = 0  # 0 = the model's max positions
    default_window: int = 0  # 0 = max context
    window_low_water: float = 0.75
    max_request_bytes: int = 16 * MIB
    max_frame: int = 16 * MIB  # largest TCP frame or WebSocket message
    max_push_entries: int = 10000
    max_entry_tokens: int = 8192
    max_new_tokens: int = 4096
    max_stop_sequences: int = 16
    max_choices: int = 64  # choices of one classification query
    token_cache_pieces: int = 65536  # pre-tokenized pieces whose tokens are kept; 0 = no cache
    ring_words: int = 1 << 22
    drain_timeout: float = 10.0  # seconds to finish in-flight queries on shutdown
    api_keys: list[str] = []
    # a baseline for benchmarks: every query re-prefills its whole context (no KV reuse)
    reprefill_queries: bool = False
    kernel_policy: str = ""  # a YAML kernel policy file (lock / allow / deny / prefer)
    kernel_tune: bool = False  # time candidate kernels on the model's shapes at startup (cached)
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (on CUDA devices)
    # before ready, compile every kernel variant a step can meet (on CUDA devices)
    warm_up_kernels: bool = True
    # launch a decode step before the last one's tokens reach the host (its input ids are
    # copied on the device), so host work overlaps the GPU (on CUDA devices); off: one step at
    # a time
    decode_run_ahead: bool = True
    # at start, move every object alive (the model, compiled kernels, graphs) out of the
    # cyclic collector's reach, so a full collection mid-stream walks only what came later
    gc_freeze: bool = True
    graph_max_batch: int = 128  # the largest decode batch captured; larger batches run eagerly
    graph_max_question: int = 128  # the longest question prefill captured (0 = none)
    # the longest session-data chunk captured (0 = none past graph_max_question): eager steps
    # of up to about a thousand tokens are bound by the host's launches, graphs are not; past
    # that the GPU is the bound, and padding to a bucket would only add work
    graph_max_data: int = 1024
    # the most sessions whose data one captured step may hold (a feed pushing to many sessions
    # at once); 0 = none: such steps run eagerly. Packed steps of 4-8 sessions' records replay
    # twice as fast as eager ones; past ``graphs.PACKED_MAX_ROWS`` rows they run eagerly
    graph_max_data_seqs: int = 64
    event_buffer: int = 1024  # events a session keeps for subscribers that fall behind
    max_flash_queries: int = 16  # flash queries per session
    prefix_cache_conversations: int = 64  # completions kept for KV reuse; 0 = no reuse
    sse_keepalive_s: float = 15.0  # seconds between SSE keep-alive comments

    def __post_init__(self) -> None:
        values = msgspec.structs.asdict(self)
        for name, value in values.items():
            _check(name, value, "Config()")
        _check_cross(values, {})

    def torch_device(self) -> torch.device:
        """The device to run on; ``cuda`` or ``cuda:N`` that this machine lacks is a ConfigError."""
        import torch

        if self.device == "cpu":
            return torch.device("cpu")
        if self.device == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        index = int(self.device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {self.device!r} was asked for but CUDA is not available")
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"device: {self.device!r} is out of range; this machine has {count} CUDA "
                f"device(s), cuda:0..cuda:{count - 1}"
            )
        return torch.device("cuda", index)

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype; ``auto`` is bfloat16 on CUDA (float16 where bf16 is missing)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device().type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def cache_path(self) -> Path:
        """Where models and other downloads are kept."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        home = os.environ.get("LIVELM_HOME")
        if home:
            return Path(home).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".cache"
        return base / "livelm"

    def check_paths(self) -> None:
        """The model folder exists and the cache folder can be created and written, else a
        ConfigError: neither heals by restarting. Checked at startup, not on construction, so a
        Config may name another machine's paths."""
        _check_model_path(self.model)
        _check_writable_dir(self.cache_path(), "cache_dir", "cache_dir (or LIVELM_HOME)")
        if self.journal_dir:
            _check_writable_dir(Path(self.journal_dir).expanduser(), "journal_dir", "journal_dir")

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for logs: API keys are replaced by their count."""
        values = msgspec.structs.asdict(self)
        values["api_keys"] = f"<{len(self.api_keys)} key(s)>"
        return values


FIELDS = {f.name: f for f in msgspec.structs.fields(Config)}
FIELD_NAMES = tuple(FIELDS)


def load_config(
    argv_overrides: Mapping[str, Any], yaml_path: str | None, environ: Mapping[str, str]
) -> Config:
    """Merge the sources (CLI > env > YAML > defaults), parse and check every value."""
    layers = [
        _yaml_layer(yaml_path) if yaml_path else {},
        _env_layer(environ),
        _cli_layer(argv_overrides),
    ]
    values = msgspec.structs.asdict(Config())
    sources = dict.fromkeys(values, "default")
    for layer in layers:
        for name, (raw, source, is_text) in layer.items():
            values[name] = _coerce(name, raw, source, is_text)
            sources[name] = source
    if sources["cache_dir"] == "default" and environ.get("LIVELM_HOME"):
        values["cache_dir"] = environ["LIVELM_HOME"]
    for name, value in values.items():
        _check(name, value, sources[name])
    _check_cross(values, sources)
    return Config(**values)


# --- sources: each gives {field: (raw value, where it came from, is it text to parse)} -------


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice (PyYAML keeps the last in silence)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what is wrong, and where (PyYAML's own message spans several)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem

Layer = dict[str, tuple[Any, str, bool]]


def _yaml_layer(path: str) -> Layer:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist or is not a file")
    try:
        # _UniqueKeyLoader is a SafeLoader: plain data only, as safe_load
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(exc)}") from exc
    if data is None:  # an empty (or all-comments) file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must be a mapping of setting: value, got {type(data).__name__}"
        )
    layer: Layer = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown key {key!r} in config file {path!r}; {_suggest(name)}")
        layer[name] = (value, f"config file {path}", False)
    return layer


def _env_layer(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for name in FIELD_NAMES:
        var = ENV_PREFIX + name.upper()
        if var in environ:
            layer[name] = (environ[var], f"environment variable {var}", True)
    return layer


# LIVELM_ variables that are not settings but are read elsewhere (the CLI, the clients, perf/).
# LIVELM_API_KEY, the clients' key, is not among them: in the daemon's environment it is most
# likely meant as LIVELM_API_KEYS, and the daemon would otherwise serve without auth in silence.
OTHER_ENV_VARS = frozenset({"CONFIG", "HOME", "URL", "COMMIT"})


def stray_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``LIVELM_`` variables the daemon does not read, each with a hint (likely typos: the
    daemon warns about them at startup rather than ignoring them in silence)."""
    stray = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):]
        if name.lower() not in FIELDS and name not in OTHER_ENV_VARS:
            close = difflib.get_close_matches(name.lower(), FIELD_NAMES, n=1, cutoff=0.6)
            hint = f"did you mean {ENV_PREFIX}{close[0].upper()}?" if close else "not a setting"
            stray.append(f"{var} ({hint})")
    return stray


def _cli_layer(overrides: Mapping[str, Any]) -> Layer:
    layer: Layer = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {key!r}; {_suggest(name)}")
        if value is not None:  # None = flag not given
            layer[name] = (value, f"--{name.replace('_', '-')}", True)
    return layer


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELD_NAMES, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known settings: " + ", ".join(FIELD_NAMES)


# --- types -----------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


def _coerce(name: str, raw: Any, source: str, is_text: bool) -> Any:
    """Turn a raw value into the field's type; text (env, CLI) is parsed, YAML must be typed."""
    kind = FIELDS[name].type
    parse = is_text and isinstance(raw, str)
    if kind is str:
        if isinstance(raw, str):
            return raw.strip().lower() if name in _LOWERED else raw
    elif kind is bool:
        value = _BOOL_WORDS.get(raw.strip().lower(), raw) if parse else raw
        if isinstance(value, bool):
            return value
    elif kind is int or kind is float:
        value = _parse_number(kind, raw) if parse else raw
        if _is_number_of(kind, value):
            return float(value) if kind is float else value
    else:  # list[str]
        value = _parse_list(name, raw, source) if parse else raw
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    expected = _TYPE_WORDS.get(kind, "a list of strings (comma-separated in env and CLI)")
    raise ConfigError(f"{name}: expected {expected}, got {_shown(name, raw)} (from {source})")


def _shown(name: str, value: Any) -> str:
    """The value for an error message; secrets are not echoed."""
    return f"a {type(value).__name__} (value hidden)" if name == "api_keys" else repr(value)


def _parse_number(kind: type, text: str) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        return text  # rejected by the caller with the type's name


def _is_number_of(kind: type, value: Any) -> bool:
    if isinstance(value, bool):  # YAML's yes/no must not pass as 1/0
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


def _parse_list(name: str, text: str, source: str) -> list[str]:
    """Comma-separated items. An empty value or an empty item is refused rather than dropped:
    an empty api_keys would override the config file's keys and switch auth off in silence."""
    parts = [part.strip() for part in text.split(",")]
    if all(parts):
        return parts
    problem = "holds an empty item" if any(parts) else "is set but empty"
    unset = _UNSET_MEANS.get(name, "use the config file's value or the default")
    raise ConfigError(
        f"{name}: {source} {problem}; give comma-separated values, or unset it to {unset}"
    )


_UNSET_MEANS = {"api_keys": "serve without keys (or with those of the config file)"}


# --- rules -----------------------------------------------------------------------------------

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LEVELS = ("debug", "info", "warning", "error", "critical")


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# field -> (is the value allowed?, what is allowed)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: bool(v.strip()), "a model folder, random:NAME or demo"),
    "host": (lambda v: bool(v.strip()), "a host name or IP address"),
    "port": (lambda v: 0 <= v <= 65535, "a port number 0..65535 (0 = any free port)"),
    "tcp_port": (lambda v: 0 <= v <= 65535, "a port number 0..65535 (0 = any free port)"),
    "device": (lambda v: bool(_DEVICE.fullmatch(v)), "one of auto, cpu, cuda, cuda:N"),
    "dtype": (
        lambda v: v in ("auto", "float32", "bfloat16", "float16"),
        "one of auto, float32, bfloat16, float16",
    ),
    "cache_dir": (lambda v: True, "a folder path"),
    "journal_dir": (lambda v: True, "a folder path (empty: no journal)"),
    "log_level": (lambda v: v in _LEVELS, "one of " + ", ".join(_LEVELS)),
    "log_format": (lambda v: v in ("json", "text"), "one of json, text"),
    "log_syslog_prefix": (lambda v: True, "true or false"),
    "block_size": (lambda v: _power_of_two(v) and v <= 256, "a power of two from 1 to 256"),
    "kv_cache_tokens": (lambda v: v >= 0, "a token count >= 0 (0 = auto)"),
    "kv_memory_fraction": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "max_batch_tokens": (lambda v: v > 0, "a positive integer"),
    "max_sessions": (lambda v: v > 0, "a positive integer"),
    "max_context_tokens": (lambda v: v >= 0, "a token count >= 0 (0 = the model's maximum)"),
    "default_window": (lambda v: v >= 0, "a token count >= 0 (0 = max context)"),
    "window_low_water": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "max_request_bytes": (lambda v: v > 0, "a positive number of bytes"),
    "max_frame": (lambda v: 64 <= v <= (1 << 32) - 1, "from 64 to 4294967295 bytes"),
    "max_push_entries": (lambda v: v > 0, "a positive integer"),
    "max_entry_tokens": (lambda v: v > 0, "a positive integer"),
    "max_new_tokens": (lambda v: v > 0, "a positive integer"),
    "max_stop_sequences": (lambda v: v > 0, "a positive integer"),
    "max_choices": (lambda v: 2 <= v <= 4096, "from 2 to 4096"),
    "token_cache_pieces": (lambda v: 0 <= v <= 1 << 24, "from 0 (off) to 16777216 pieces"),
    "ring_words": (lambda v: _power_of_two(v) and v >= 1024, "a power of two >= 1024"),
    "drain_timeout": (lambda v: v >= 0, "a number of seconds >= 0"),
    "api_keys": (lambda v: all(k.strip() for k in v), "a list of non-empty keys"),
    "reprefill_queries": (lambda v: True, "true or false"),
    "kernel_policy": (lambda v: not v or Path(v).expanduser().is_file(), "a readable YAML file, or empty"),
    "kernel_tune": (lambda v: True, "true or false"),
    "cuda_graphs": (lambda v: True, "true or false"),
    "warm_up_kernels": (lambda v: True, "true or false"),
    "decode_run_ahead": (lambda v: True, "true or false"),
    "gc_freeze": (lambda v: True, "true or false"),
    "graph_max_batch": (lambda v: 1 <= v <= 256, "from 1 to 256"),
    "graph_max_question": (lambda v: 0 <= v <= 128, "from 0 to 128"),
    "graph_max_data": (lambda v: 0 <= v <= 4096, "from 0 to 4096 (0 = none)"),
    "graph_max_data_seqs": (lambda v: 0 <= v <= 255, "from 0 to 255 (0 = none)"),
    "event_buffer": (lambda v: 1 <= v <= 1_000_000, "from 1 to 1000000 events"),
    "max_flash_queries": (lambda v: 0 <= v <= 1024, "from 0 to 1024 (0 = flash queries off)"),
    "prefix_cache_conversations": (lambda v: 0 <= v <= 65536, "from 0 (reuse off) to 65536"),
    "sse_keepalive_s": (lambda v: 0.05 <= v <= 3600, "from 0.05 to 3600 seconds"),
}

# settings compared case-insensitively (``INFO``, ``CUDA:1``)
_LOWERED = ("device", "dtype", "log_level", "log_format")


def _check(name: str, value: Any, source: str) -> None:
    kind = FIELDS[name].type
    kind = kind if kind in _TYPE_WORDS else list
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = _TYPE_WORDS.get(kind, "a list")
        raise ConfigError(f"{name}: expected {expected}, got {_shown(name, value)} (from {source})")
    rule, allowed = _RULES[name]
    if not rule(value):
        raise ConfigError(f"{name}: must be {allowed}, got {_shown(name, value)} (from {source})")


def _check_cross(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Rules between settings; ``values`` holds every field."""

    def where(name: str) -> str:
        return sources.get(name, "Config()")

    port, tcp_port = values["port"], values["tcp_port"]
    if port and port == tcp_port:
        raise ConfigError(
            f"port and tcp_port must differ, both are {port} "
            f"(from {where('port')} and {where('tcp_port')})"
        )
    limit, window = values["max_context_tokens"], values["default_window"]
    if limit and window > limit:
        raise ConfigError(
            f"default_window: must be <= max_context_tokens ({limit}), "
            f"got {window} (from {where('default_window')})"
        )


# --- startup checks of the filesystem -----------------------------------------------------

_BUILT_IN_MODEL = "demo"  # model.loader.DEMO_SPEC (the loader imports torch)


def _check_model_path(model: str) -> None:
    if model == _BUILT_IN_MODEL or model.startswith(PRESET_PREFIX):
        return
    folder = Path(model).expanduser()
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(
            f"model: {str(folder)!r} {state} (a model is a Hugging Face folder, "
            f"{_BUILT_IN_MODEL!r} or {PRESET_PREFIX}NAME)"
        )


def _check_writable_dir(folder: Path, setting: str, knob: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"{setting}: {str(folder)!r} cannot be created or written ({reason}); point "
            f"{knob} at a folder the daemon's user can write"
        ) from exc
