"""The ``livelm`` command line: help, config errors (exit 2), model load errors (exit 3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from livelm.daemon.cli import build_parser, main
from livelm.daemon.cli_config import CONFIG_FLAGS, flag_help
from livelm.daemon.config import Config


def livelm(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livelm.daemon", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_serve_help_lists_every_flag() -> None:
    result = livelm("serve", "--help")
    assert result.returncode == 0
    for flag in [*CONFIG_FLAGS, "--config"]:
        assert flag in result.stdout
    assert "PATH|random:NAME|demo" in result.stdout


def test_help_defaults_come_from_the_config() -> None:
    defaults = Config()
    assert flag_help("--block-size").endswith(f"(default {defaults.block_size})")
    assert flag_help("--max-frame").endswith("(default 16 MiB)")
    assert flag_help("--port").endswith(f"(default {defaults.port}; 0 = any free port)")
    assert flag_help("--cache-dir").endswith("(default $LIVELM_HOME or ~/.cache/livelm)")
    for flag in CONFIG_FLAGS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        if default != "" and flag != "--max-frame":
            assert f"(default {default}" in flag_help(flag), flag


@pytest.mark.parametrize("verb", ["serve", "kernels"])
def test_block_size_help_shows_the_real_default(verb: str) -> None:
    result = livelm(verb, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert f"a power of two up to 256 (default {Config().block_size})" in text


def test_top_level_help_lists_serve() -> None:
    result = livelm("--help")
    assert result.returncode == 0 and "serve" in result.stdout


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_bad_port_exits_2_with_a_clear_message() -> None:
    result = livelm("serve", "--port", "notanumber")
    assert result.returncode == 2
    assert "port: expected an integer, got 'notanumber' (from --port)" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_yaml_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("blok_size: 16\n", encoding="utf-8")
    result = livelm("serve", "--config", str(config))
    assert result.returncode == 2
    assert (
        "unknown key 'blok_size'" in result.stderr and "did you mean 'block_size'?" in result.stderr
    )


def test_missing_yaml_exits_2(tmp_path: Path) -> None:
    result = livelm("serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_unknown_flag_exits_2() -> None:
    result = livelm("serve", "--no-such-flag")
    assert result.returncode == 2 and "--no-such-flag" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_cuda_on_cpu_only_machine_exits_2() -> None:
    result = livelm("serve", "--device", "cuda", "--port", "0", "--tcp-port", "0")
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr


def test_missing_model_folder_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    args = ["serve", "--model", str(missing), "--port", "0", "--tcp-port", "0"]
    result = livelm(*args, "--cache-dir", str(tmp_path), "--log-format", "text")
    assert result.returncode == 2, result.stderr
    assert f"invalid configuration: model: '{missing}' does not exist" in result.stderr
    assert "listening on" not in result.stderr  # refused before anything listens


def test_unloadable_model_exits_3(tmp_path: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    args = ["serve", "--model", str(folder), "--port", "0", "--tcp-port", "0"]
    result = livelm(*args, "--cache-dir", str(tmp_path), "--log-format", "text")
    assert result.returncode == 3, result.stderr
    assert "cannot load model" in result.stderr and str(folder) in result.stderr


def test_unusable_cache_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    args = ["serve", "--port", "0", "--tcp-port", "0", "--log-format", "text"]
    result = livelm(*args, "--cache-dir", str(blocker))
    assert result.returncode == 2, result.stderr
    assert f"invalid configuration: cache_dir: '{blocker}' cannot be created or written" in (
        result.stderr
    )


def test_empty_api_keys_env_exits_2_before_serving(tmp_path: Path) -> None:
    config = tmp_path / "keys.yaml"
    config.write_text("api_keys: [from-yaml]\n", encoding="utf-8")
    args = ["serve", "--config", str(config), "--port", "0", "--tcp-port", "0"]
    result = livelm(*args, env={"LIVELM_API_KEYS": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "livelm: configuration error: api_keys: environment variable LIVELM_API_KEYS is set but "
        "empty; give comma-separated values, or unset it to serve without keys (or with those of "
        "the config file)"
    ]


def test_flags_only_given_reach_the_config() -> None:
    args = build_parser().parse_args(["serve", "--block-size", "32"])
    assert args.block_size == "32"
    assert not hasattr(args, "port")  # not given: env and YAML keep their say


def test_streaming_flags_reach_the_config() -> None:
    from livelm.daemon.cli_config import config_from_args

    flags = ["--max-frame", "4096", "--event-buffer", "7", "--max-flash-queries", "0",
             "--prefix-cache-conversations", "3"]
    config = config_from_args(build_parser().parse_args(["serve", *flags]))
    assert (config.max_frame, config.event_buffer) == (4096, 7)
    assert (config.max_flash_queries, config.prefix_cache_conversations) == (0, 3)


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = ["serve", "--port", port, "--tcp-port", "0", "--cache-dir", str(tmp_path)]
        result = livelm(*args)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
