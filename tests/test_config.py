"""Config: precedence of the sources, parsing, every validation rule and its message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from livelm.daemon.config import FIELDS, Config, load_config, stray_env_vars
from livelm.protocol.errors import ConfigError


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "livelm.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(overrides=None, yaml_path=None, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides or {}, yaml_path, environ or {})
    return str(info.value)


# --- precedence --------------------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    config = load_config({}, None, {})
    assert config == Config()
    assert config.port == 8080 and config.tcp_port == 8081
    assert config.max_request_bytes == 16 * 1024 * 1024
    assert config.ring_words == 1 << 22
    assert config.api_keys == []


def test_cli_beats_env_beats_yaml_beats_defaults(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "port: 9001\nblock_size: 32\nhost: 0.0.0.0\nmodel: y\n")
    environ = {"LIVELM_PORT": "9002", "LIVELM_BLOCK_SIZE": "64", "LIVELM_MODEL": "e"}
    config = load_config({"port": "9003"}, yaml_path, environ)
    assert config.port == 9003  # CLI
    assert config.block_size == 64  # env over YAML
    assert config.model == "e"  # env over YAML
    assert config.host == "0.0.0.0"  # YAML over default
    assert config.tcp_port == 8081  # default


def test_flags_not_given_do_not_override(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "port: 9001\n")
    assert load_config({"port": None}, yaml_path, {}).port == 9001


def test_env_values_are_parsed_to_the_field_types() -> None:
    environ = {
        "LIVELM_KV_MEMORY_FRACTION": "0.5",
        "LIVELM_DRAIN_TIMEOUT": "3",
        "LIVELM_API_KEYS": " k1, k2 ",
        "LIVELM_MAX_SESSIONS": " 12 ",
        "LIVELM_LOG_LEVEL": "DEBUG",
    }
    config = load_config({}, None, environ)
    assert config.kv_memory_fraction == 0.5
    assert config.drain_timeout == 3.0 and isinstance(config.drain_timeout, float)
    assert config.api_keys == ["k1", "k2"]
    assert config.max_sessions == 12
    assert config.log_level == "debug"


def test_unrelated_env_vars_are_ignored() -> None:
    assert load_config({}, None, {"LIVELM_URL": "x", "PORT": "1"}) == Config()


def test_stray_livelm_env_vars_are_named_with_a_hint() -> None:
    environ = {
        "LIVELM_MAX_BATCH_TOKEN": "4096",  # a typo of LIVELM_MAX_BATCH_TOKENS
        "LIVELM_PORT": "9000",  # a setting
        "LIVELM_HOME": "/srv/livelm",  # read elsewhere, not a setting
        "LIVELM_API_KEY": "k",  # the clients' key: in the daemon's environment, a likely slip
        "LIVELM_FROBNICATE": "1",
        "PATH": "/usr/bin",
    }
    assert stray_env_vars(environ) == [
        "LIVELM_API_KEY (did you mean LIVELM_API_KEYS?)",
        "LIVELM_FROBNICATE (not a setting)",
        "LIVELM_MAX_BATCH_TOKEN (did you mean LIVELM_MAX_BATCH_TOKENS?)",
    ]


def test_yaml_keys_may_use_dashes_and_int_for_float(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "max-batch-tokens: 512\nkv_memory_fraction: 1\n")
    config = load_config({}, yaml_path, {})
    assert config.max_batch_tokens == 512
    assert config.kv_memory_fraction == 1.0


def test_yaml_api_keys_list(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "api_keys: [a, b]\n")
    assert load_config({}, yaml_path, {}).api_keys == ["a", "b"]


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "# only comments\n")
    assert load_config({}, yaml_path, {}) == Config()


# --- validation messages -----------------------------------------------------------------------


def test_unknown_yaml_key_suggests_the_closest(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "max_batch_token: 512\n")
    message = config_error(yaml_path=yaml_path)
    assert "unknown key 'max_batch_token'" in message
    assert "did you mean 'max_batch_tokens'?" in message
    assert yaml_path in message


def test_unknown_yaml_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    message = config_error(yaml_path=write_yaml(tmp_path, "zzzz: 1\n"))
    assert "known settings:" in message and "block_size" in message


def test_missing_yaml_file(tmp_path: Path) -> None:
    message = config_error(yaml_path=str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in message and "does not exist" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    message = config_error(yaml_path=write_yaml(tmp_path, "- port\n- 8080\n"))
    assert "must be a mapping" in message and "list" in message


def test_yaml_syntax_error(tmp_path: Path) -> None:
    message = config_error(yaml_path=write_yaml(tmp_path, "port: [8080\nhost: x\n"))
    assert "not valid YAML" in message and "(line 2, column 5)" in message
    assert "\n" not in message  # one line in the journal


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML keeps the last of two in silence: an operator's edit lower down would win, or
    be overridden, unseen."""
    message = config_error(yaml_path=write_yaml(tmp_path, "port: 8080\nport: 9090\n"))
    assert "key 'port' appears twice (line 2" in message


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LIVELM_PORT": "http"}, "port: expected an integer, got 'http'"),
        ({"LIVELM_KV_MEMORY_FRACTION": "half"}, "kv_memory_fraction: expected a finite number"),
        ({"LIVELM_DRAIN_TIMEOUT": "inf"}, "drain_timeout: expected a finite number"),
        ({"LIVELM_BLOCK_SIZE": "1.5"}, "block_size: expected an integer, got '1.5'"),
    ],
)
def test_env_type_errors_name_field_value_and_variable(environ, expected) -> None:
    message = config_error(environ=environ)
    assert expected in message
    assert f"environment variable {next(iter(environ))}" in message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("port: '8080'\n", "port: expected an integer, got '8080'"),
        ("port: yes\n", "port: expected an integer, got True"),
        ("model: 12\n", "model: expected a string, got 12"),
        ("api_keys: abc\n", "api_keys: expected a list of strings"),
        ("api_keys: [1, 2]\n", "api_keys: expected a list of strings"),
    ],
)
def test_yaml_type_errors(tmp_path: Path, yaml_text: str, expected: str) -> None:
    message = config_error(yaml_path=write_yaml(tmp_path, yaml_text))
    assert expected in message and "livelm.yaml" in message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("port", "70000", "a port number 0..65535"),
        ("port", "-1", "a port number 0..65535"),
        ("tcp_port", "65536", "a port number 0..65535"),
        ("block_size", "24", "a power of two from 1 to 256"),
        ("block_size", "512", "a power of two from 1 to 256"),
        ("block_size", "0", "a power of two from 1 to 256"),
        ("ring_words", "512", "a power of two >= 1024"),
        ("ring_words", "3000", "a power of two >= 1024"),
        ("kv_memory_fraction", "0", "a fraction in (0, 1]"),
        ("kv_memory_fraction", "1.5", "a fraction in (0, 1]"),
        ("window_low_water", "-0.1", "a fraction in (0, 1]"),
        ("max_batch_tokens", "0", "a positive integer"),
        ("max_sessions", "-5", "a positive integer"),
        ("max_push_entries", "0", "a positive integer"),
        ("max_entry_tokens", "0", "a positive integer"),
        ("max_new_tokens", "0", "a positive integer"),
        ("max_stop_sequences", "0", "a positive integer"),
        ("max_request_bytes", "0", "a positive number of bytes"),
        ("kv_cache_tokens", "-1", "a token count >= 0"),
        ("max_context_tokens", "-1", "a token count >= 0"),
        ("default_window", "-1", "a token count >= 0"),
        ("drain_timeout", "-1", "a number of seconds >= 0"),
        ("device", "tpu", "one of auto, cpu, cuda, cuda:N"),
        ("device", "cuda:x", "one of auto, cpu, cuda, cuda:N"),
        ("dtype", "int8", "one of auto, float32, bfloat16, float16"),
        ("log_level", "loud", "one of debug, info, warning, error, critical"),
        ("log_format", "xml", "one of json, text"),
        ("model", " ", "a model folder, random:NAME or demo"),
        ("host", "", "a host name or IP address"),
    ],
)
def test_rule_errors_name_field_value_source_and_allowed(field: str, value: str, allowed: str):
    message = config_error(overrides={field: value})
    flag = "--" + field.replace("_", "-")
    assert message.startswith(f"{field}: must be {allowed}")
    kind = FIELDS[field].type
    shown = kind(value) if kind in (int, float) else value
    shown = shown.lower() if field in ("device", "dtype", "log_level", "log_format") else shown
    assert f"got {shown!r} (from {flag})" in message


def test_valid_edge_values_are_accepted() -> None:
    config = load_config(
        {"block_size": "1", "ring_words": "1024", "kv_memory_fraction": "1", "port": "0"},
        None,
        {"LIVELM_BLOCK_SIZE": "256"},
    )
    assert (config.block_size, config.ring_words, config.port) == (1, 1024, 0)
    assert load_config({"block_size": "256"}, None, {}).block_size == 256


def test_ports_must_differ() -> None:
    message = config_error(overrides={"tcp_port": "8080"})
    assert "port and tcp_port must differ" in message and "--tcp-port" in message


def test_window_must_fit_max_context() -> None:
    message = config_error(overrides={"max_context_tokens": "100", "default_window": "200"})
    assert "default_window: must be <= max_context_tokens (100), got 200" in message


def test_empty_api_key_in_yaml(tmp_path: Path) -> None:
    message = config_error(yaml_path=write_yaml(tmp_path, "api_keys: ['sekrit', ' ']\n"))
    assert "api_keys: must be a list of non-empty keys" in message
    assert "sekrit" not in message  # keys are never echoed


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "is set but empty"), ("  ", "is set but empty"), (",,", "is set but empty"),
     ("sekrit,,other", "holds an empty item"), ("sekrit,", "holds an empty item")],
)
def test_api_keys_from_env_without_a_key_is_an_error(
    tmp_path: Path, value: str, problem: str
) -> None:
    yaml_path = write_yaml(tmp_path, "api_keys: [from-yaml]\n")
    message = config_error(yaml_path=yaml_path, environ={"LIVELM_API_KEYS": value})
    assert message == (
        f"api_keys: environment variable LIVELM_API_KEYS {problem}; give comma-separated "
        "values, or unset it to serve without keys (or with those of the config file)"
    )


def test_api_keys_from_the_command_line_without_a_key_is_an_error() -> None:
    message = config_error(overrides={"api_keys": ""})
    assert message.startswith("api_keys: --api-keys is set but empty;")
    assert "unset it to serve without keys" in message


def test_api_keys_env_unset_keeps_the_yaml_keys(tmp_path: Path) -> None:
    yaml_path = write_yaml(tmp_path, "api_keys: [from-yaml]\n")
    assert load_config({}, yaml_path, {}).api_keys == ["from-yaml"]
    assert load_config({}, yaml_path, {"LIVELM_API_KEYS": "a,b"}).api_keys == ["a", "b"]


def test_unknown_override_key() -> None:
    assert "did you mean 'block_size'?" in config_error(overrides={"blok_size": "16"})


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="block_size: must be a power of two"):
        Config(block_size=3)
    with pytest.raises(ConfigError, match="port: expected an integer"):
        Config(port="8080")  # type: ignore[arg-type]


# --- resolved helpers --------------------------------------------------------------------------

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")


@needs_no_cuda
def test_auto_device_on_cpu_only_machine() -> None:
    config = Config()
    assert config.torch_device() == torch.device("cpu")
    assert config.torch_dtype() == torch.float32


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError, match=f"device: '{device}'.*CUDA is not available"):
        Config(device=device).torch_device()


def test_cuda_index_out_of_range() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bad = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match="out of range"):
        Config(device=bad).torch_device()


def test_explicit_dtype() -> None:
    assert Config(device="cpu", dtype="bfloat16").torch_dtype() == torch.bfloat16
    assert Config(device="cpu", dtype="float16").torch_dtype() == torch.float16


def test_cache_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config(cache_dir=str(tmp_path)).cache_path() == tmp_path
    assert load_config({}, None, {"LIVELM_HOME": "/srv/lv"}).cache_path() == Path("/srv/lv")
    explicit = {"LIVELM_HOME": "/srv/lv", "LIVELM_CACHE_DIR": "/x"}
    assert load_config({}, None, explicit).cache_path() == Path("/x")
    monkeypatch.delenv("LIVELM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Config().cache_path() == tmp_path / "livelm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert Config().cache_path() == Path.home() / ".cache" / "livelm"


def test_check_paths_accepts_built_in_models_and_a_folder(tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    for model in ("demo", "random:tiny", str(tmp_path)):
        Config(model=model, cache_dir=str(cache)).check_paths()
    assert cache.is_dir()  # created


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_check_paths_refuses_a_model_folder_that_is_not_there(tmp_path: Path, kind: str) -> None:
    model = tmp_path / "model"
    if kind == "file":
        model.write_text("x", encoding="utf-8")
    state = "does not exist" if kind == "missing" else "is not a folder"
    with pytest.raises(ConfigError, match=f"^model: '{model}' {state} "):
        Config(model=str(model), cache_dir=str(tmp_path)).check_paths()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_check_paths_refuses_a_cache_dir_that_cannot_be_created(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x", encoding="utf-8")
    cache = blocker if where == "a file" else blocker / "cache"
    with pytest.raises(ConfigError, match=f"^cache_dir: '{cache}' cannot be created or written"):
        Config(cache_dir=str(cache)).check_paths()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_check_paths_refuses_a_read_only_cache_dir(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be created or written"):
            Config(cache_dir=str(cache)).check_paths()
    finally:
        cache.chmod(0o700)


def test_log_syslog_prefix_setting() -> None:
    assert Config().log_syslog_prefix is False
    assert load_config({}, None, {"LIVELM_LOG_SYSLOG_PREFIX": "yes"}).log_syslog_prefix is True


def test_redacted_hides_api_keys() -> None:
    shown = Config(api_keys=["secret"]).redacted()
    assert "secret" not in str(shown) and shown["port"] == 8080


def test_example_yaml_of_the_systemd_unit_loads_and_lists_every_setting() -> None:
    example = Path(__file__).resolve().parents[1] / "systemd" / "livelm.yaml"
    config = load_config({}, str(example), {})
    assert config.cache_dir == "/var/cache/livelm"
    # production: a GPU that is not ready must not mean serving on the CPU; journald priorities
    assert config.device == "cuda" and config.log_syslog_prefix is True
    text = example.read_text(encoding="utf-8")
    missing = [name for name in FIELDS if f"\n{name}:" not in text]
    assert not missing, f"settings not documented in {example.name}: {missing}"
