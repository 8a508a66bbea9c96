"""Bad input to any command: a non-zero exit and one human line on stderr, never a traceback,
and nothing done before the error (no file, folder or misleading line left behind)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skinflint.cli.errors import describe


def _skinflint(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "skinflint.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line(run: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("skinflint") and run.stderr.count("\n") == 1, run.stderr
    for text in expected:
        assert text in run.stderr
    return run.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["cache", "stats", "--db", "/missing/x.db"], "no cache database: /missing/x.db"),
        (["demo", "--requests", "-5"], "--requests: must be 1 or more, not -5"),
        (["demo", "--requests", "0"], "--requests: must be 1 or more"),
        (["demo", "--concurrency", "0"], "--concurrency"),
        (["serve", "--port", "70000"], "--port: must be a port from 0 to 65535, not 70000"),
        (["serve", "--port", "-1"], "--port"),
        (["serve", "--workers", "0"], "--workers"),
        (["serve", "--workers", "2", "--port", "0"], "port 0"),
        (["replay", "/missing/dataset.csv"], "no such file or directory: /missing/dataset.csv"),
        (["cache", "calibrate", "pairs.jsonl", "--precision", "1.5"], "--precision"),
        (["--config", "/missing/c.yaml", "prices"], "config: cannot read /missing/c.yaml"),
    ],
)
def test_bad_arguments(argv: list[str], expected: str, tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"text_a": "a", "text_b": "b", "label": 1}\n')
    _assert_one_line(_skinflint(tmp_path, *argv), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing created


def test_cache_stats_does_not_create_a_database(tmp_path: Path) -> None:
    _assert_one_line(_skinflint(tmp_path, "cache", "stats"), "no cache database: ./skinflint.db")
    _assert_one_line(_skinflint(tmp_path, "cache", "stats", "--db", "x.db"), "x.db")
    assert list(tmp_path.iterdir()) == []


def test_replay_of_an_unreadable_dataset_says_only_that(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("hello\n")
    run = _skinflint(tmp_path, "replay", "notes.csv")
    _assert_one_line(run, "notes.csv is not in RouterBench format")
    assert run.stdout == "" and "semantic" not in run.stderr
    (tmp_path / "empty.jsonl").write_text("")
    _assert_one_line(_skinflint(tmp_path, "replay", "empty.jsonl"), "no recorded samples")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file or directory"),
        ('{"prompt": "a"}\n', "data.jsonl:1: each line must be an object with prompt and task"),
        ("not json\n", "data.jsonl:1: not JSON"),
        ('{"prompt": "a", "task": "x"}\n', "at least two tasks"),
    ],
)
def test_train_router_leaves_no_folder_on_bad_input(
    content: str | None, expected: str, tmp_path: Path
) -> None:
    if content is not None:
        (tmp_path / "data.jsonl").write_text(content)
    _assert_one_line(_skinflint(tmp_path, "train-router", "data.jsonl"), expected)
    assert not (tmp_path / "router").exists()


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_cache_pairs_are_checked_before_anything_is_written(command: str, tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"question": "a"}\n')
    run = _skinflint(tmp_path, "cache", command, "pairs.jsonl")
    _assert_one_line(run, "pairs.jsonl:1: each line must be an object with text_a, text_b, label")
    (tmp_path / "pairs.jsonl").write_text("\n")
    _assert_one_line(_skinflint(tmp_path, "cache", command, "pairs.jsonl"), "no pairs in")
    assert not (tmp_path / "skinflint.yaml").exists()  # calibrate writes only a real result


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"providers": {"p": {"base_url": "http://x"}}, "models": {"a": {"provider": "no"}}},
            "skinflint: config: models.a.provider: unknown provider 'no'\n",
        ),
        (
            {"cache": {"exact": {"ttl_seconds": -3}}},
            "skinflint: config: cache.exact.ttl_seconds: must be >= 0\n",
        ),
        (
            {"routes": {"auto": {"tasks": {}}}},
            "skinflint: config: routes.auto: tasks missing from tasks: default\n",
        ),
        ({"keys": [{}]}, "skinflint: config: keys[0].tenant: is required\n"),
        ({"server": {"port": 70000}}, "skinflint: config: server.port: must be <= 65535\n"),
        ({"colour": "blue"}, "skinflint: config: colour: unknown key\n"),
        (
            {"providers": {"p": {"kind": "grpc", "base_url": "x"}}},
            "skinflint: config: providers.p.kind: must be 'openai-compatible', 'anthropic' "
            "or 'replay'\n",
        ),
    ],
)
def test_config_errors_name_the_key_once(
    config: dict[str, object], expected: str, tmp_path: Path
) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    for command in (["prices"], ["serve"], ["report"]):
        run = _skinflint(tmp_path, "--config", "c.yaml", *command)
        _assert_one_line(run)
        assert run.stderr == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("cache: [1\n")
    run = _skinflint(tmp_path, "--config", "c.yaml", "prices")
    _assert_one_line(run, "config: c.yaml is not valid YAML (line 2, column 1): expected ','")


def test_describe_names_the_file_without_errno() -> None:
    err = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert describe(err) == "No such file or directory: /x/y"
    assert describe(ValueError("two\n  lines")) == "two lines"
