"""Validation at enqueue, the retry policy and settings parsing, against a real queue file.

Every refusal must be an InvalidJobError naming the field, and must leave the database as it
was: each case opens a real queue with one job already in it and checks the row count after.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from graphiti_mpq import api
from graphiti_mpq.config import Settings, load_settings, parse_duration
from graphiti_mpq.errors import ConfigError, InvalidJobError, QueueError
from graphiti_mpq.retry import retry_delay
from graphiti_mpq.storage.sqlite import JobQueue
from graphiti_mpq.validation import MAX_PAYLOAD_BYTES, compact_json, validate_payload

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


def count_jobs(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def queue(queue_path: str) -> Iterator[JobQueue]:
    """A real queue that already holds one valid job (so "nothing written" means count == 1)."""
    q = JobQueue(queue_path).open()
    q.enqueue("seed", {"command": "add", "args": ["x"]})
    yield q
    q.close()


def assert_refused(
    q: JobQueue, field: str, job_type: Any, payload: Any, parallel: Any = False, **options: Any
) -> InvalidJobError:
    before = count_jobs(q.location)
    with pytest.raises(InvalidJobError) as info:
        q.enqueue(job_type, payload, parallel, **options)
    exc = info.value
    assert isinstance(exc, QueueError)
    assert exc.field == field, str(exc)
    assert field in str(exc)
    assert "\n" not in str(exc)
    assert count_jobs(q.location) == before
    return exc


def test_limit_is_one_mebibyte() -> None:
    assert MAX_PAYLOAD_BYTES == MIB


# -- replay payloads -----------------------------------------------------------------------

VALID_REPLAY = [
    {"command": "add"},
    {"command": "add", "args": [], "kwargs": {}},
    {"command": "a"},
    {"command": "0"},
    {"command": "memory:add.v2_x-y"},
    {"command": ["memory", "add"]},
    {"command": ["a"] * 8},
    {"command": "add", "args": ["content", "-starts-with-dash", "", "ünïcödé 🎉"]},
    {
        "command": "add",
        "kwargs": {
            "scope": "project",
            "force": True,
            "dry_run": False,
            "max-items": 5,
            "ratio": 0.5,
            "none": None,
            "tag": ["a", "b"],
            "verbose": [True, True],
            "mixed": ["a", 1, 2.5, None, False],
            "empty": [],
            "X9_-": "ok",
        },
    },
    {"command": "add", "cwd": "/"},
    {"command": "add", "cwd": "/abs/path with space"},
    # payloads without a command are free-form JSON objects
    {},
    {"anything": {"nested": [[1, 2], {"deep": None}]}, "cwd": "relative is fine here"},
]


@pytest.mark.parametrize("payload", VALID_REPLAY)
def test_valid_payloads_are_stored_as_given(queue: JobQueue, payload: dict[str, Any]) -> None:
    job_id = queue.enqueue("replay", payload)
    assert queue.get_job(job_id).payload == payload
    assert count_jobs(queue.location) == 2


INVALID_REPLAY: list[tuple[str, Any, str]] = [
    # (case id, payload, field named)
    ("cmd-empty", {"command": ""}, "payload.command"),
    ("cmd-trailing-newline", {"command": "add\n"}, "payload.command"),
    ("cmd-leading-newline", {"command": "\nadd"}, "payload.command"),
    ("cmd-inner-newline", {"command": "ad\nd"}, "payload.command"),
    ("cmd-leading-dash", {"command": "-rf"}, "payload.command"),
    ("cmd-leading-underscore", {"command": "_add"}, "payload.command"),
    ("cmd-leading-dot", {"command": ".add"}, "payload.command"),
    ("cmd-space", {"command": "add x"}, "payload.command"),
    ("cmd-slash", {"command": "../bin/sh"}, "payload.command"),
    ("cmd-semicolon", {"command": "add;rm"}, "payload.command"),
    ("cmd-non-ascii", {"command": "ädd"}, "payload.command"),
    ("cmd-nul", {"command": "add\x00"}, "payload.command"),
    ("cmd-int", {"command": 5}, "payload.command"),
    ("cmd-none", {"command": None}, "payload.command"),
    ("cmd-dict", {"command": {"a": "b"}}, "payload.command"),
    ("cmd-list-empty", {"command": []}, "payload.command"),
    ("cmd-list-9", {"command": ["a"] * 9}, "payload.command"),
    ("cmd-list-bad-part", {"command": ["memory", "add\n"]}, "payload.command[1]"),
    ("cmd-list-int-part", {"command": [1]}, "payload.command[0]"),
    ("cmd-list-nested", {"command": [["memory"]]}, "payload.command[0]"),
    ("args-str", {"command": "add", "args": "content"}, "payload.args"),
    ("args-none", {"command": "add", "args": None}, "payload.args"),
    ("args-dict", {"command": "add", "args": {"a": "b"}}, "payload.args"),
    ("args-int-item", {"command": "add", "args": ["a", 1]}, "payload.args[1]"),
    ("args-none-item", {"command": "add", "args": [None]}, "payload.args[0]"),
    ("args-list-item", {"command": "add", "args": [["a"]]}, "payload.args[0]"),
    ("args-bool-item", {"command": "add", "args": [True]}, "payload.args[0]"),
    ("kwargs-list", {"command": "add", "kwargs": ["a"]}, "payload.kwargs"),
    ("kwargs-str", {"command": "add", "kwargs": "a=b"}, "payload.kwargs"),
    ("kwarg-value-dict", {"command": "add", "kwargs": {"a": {"b": 1}}}, "payload.kwargs.a"),
    ("kwarg-nested-list", {"command": "add", "kwargs": {"tag": [["a"]]}}, "payload.kwargs.tag[0]"),
    (
        "kwarg-list-of-dict",
        {"command": "add", "kwargs": {"tag": ["a", {"b": 1}]}},
        "payload.kwargs.tag[1]",
    ),
    ("kwarg-nan", {"command": "add", "kwargs": {"n": math.nan}}, "payload.kwargs.n"),
    ("kwarg-inf", {"command": "add", "kwargs": {"n": math.inf}}, "payload.kwargs.n"),
    ("kwarg-neg-inf", {"command": "add", "kwargs": {"n": -math.inf}}, "payload.kwargs.n"),
    (
        "kwarg-nan-in-list",
        {"command": "add", "kwargs": {"n": [1.0, math.nan]}},
        "payload.kwargs.n[1]",
    ),
    ("cwd-relative", {"command": "add", "cwd": "rel/path"}, "payload.cwd"),
    ("cwd-dot", {"command": "add", "cwd": "./x"}, "payload.cwd"),
    ("cwd-tilde", {"command": "add", "cwd": "~/x"}, "payload.cwd"),
    ("cwd-empty", {"command": "add", "cwd": ""}, "payload.cwd"),
    ("cwd-int", {"command": "add", "cwd": 5}, "payload.cwd"),
    ("cwd-none", {"command": "add", "cwd": None}, "payload.cwd"),
]


@pytest.mark.parametrize(
    ("payload", "field"),
    [pytest.param(p, f, id=i) for i, p, f in INVALID_REPLAY],
)
def test_invalid_replay_payload_is_refused(queue: JobQueue, payload: Any, field: str) -> None:
    assert_refused(queue, field, "replay", payload)


@pytest.mark.parametrize(
    "key", ["1x", "_x", "-x", "", "a b", "x\n", "a.b", "a:b", "ä", "x=y", "a: b"]
)
def test_invalid_kwarg_key_is_refused_naming_it(queue: JobQueue, key: str) -> None:
    exc = assert_refused(
        queue, f"payload.kwargs[{key!r}]", "replay", {"command": "add", "kwargs": {key: "v"}}
    )
    assert "^[A-Za-z][A-Za-z0-9_-]*$" in str(exc)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param([], "payload", id="list"),
        pytest.param([{"command": "add"}], "payload", id="list-of-object"),
        pytest.param(None, "payload", id="none"),
        pytest.param("add", "payload", id="str"),
        pytest.param('{"command": "add"}', "payload", id="json-text"),
        pytest.param(5, "payload", id="int"),
        pytest.param({"x": math.nan}, "payload", id="nan-anywhere"),
        pytest.param({"x": [math.inf]}, "payload", id="inf-anywhere"),
        pytest.param({"x": object()}, "payload", id="not-serialisable"),
        pytest.param({"x": {1, 2}}, "payload", id="set"),
        pytest.param({("a", "b"): 1}, "payload", id="tuple-key"),
        pytest.param({"x": "\ud800"}, "payload", id="lone-surrogate"),
        pytest.param({"command": "add", "args": ["\udcff"]}, "payload.args[0]", id="surrogate-arg"),
    ],
)
def test_payload_must_be_a_json_object(queue: JobQueue, payload: Any, field: str) -> None:
    assert_refused(queue, field, "t", payload)


# -- the 1 MiB limit, measured as compact UTF-8 JSON ----------------------------------------


def _filler_for(size: int, char: str = "x") -> dict[str, Any]:
    """A payload whose compact UTF-8 JSON is exactly ``size`` bytes."""
    overhead = len(compact_json({"content": ""}).encode())
    room = size - overhead
    width = len(char.encode())
    content = char * (room // width) + "x" * (room % width)
    payload = {"content": content}
    assert len(compact_json(payload).encode()) == size
    return payload


@pytest.mark.parametrize("char", ["x", "é", "€", "🎉"])
def test_payload_of_exactly_the_limit_passes_one_byte_more_fails(
    queue: JobQueue, char: str
) -> None:
    exact = _filler_for(MIB, char)
    job_id = queue.enqueue("big", exact)
    assert queue.get_job(job_id).payload == exact
    assert count_jobs(queue.location) == 2

    over = _filler_for(MIB + 1, char)
    exc = assert_refused(queue, "payload", "big", over)
    assert str(MIB + 1) in str(exc)


def test_multibyte_characters_count_as_bytes_not_characters(queue: JobQueue) -> None:
    # 400 000 characters, 1 200 000 bytes: under the limit in characters, over it in bytes
    payload = {"content": "€" * 400_000}
    assert len(compact_json(payload)) < MIB
    assert_refused(queue, "payload", "big", payload)


def test_size_is_measured_compact_and_without_ascii_escapes(queue: JobQueue) -> None:
    # Default separators (", ") or \\u escapes would make these larger than 1 MiB.
    spaced = {"n": [1] * 500_000}
    assert len(compact_json(spaced).encode()) < MIB < len(str(spaced).encode())
    accented = {"content": "é" * 500_000}
    assert len(compact_json(accented).encode()) < MIB
    queue.enqueue("big", spaced)
    queue.enqueue("big", accented)
    assert count_jobs(queue.location) == 3


def test_replay_payload_over_the_limit_is_refused(queue: JobQueue) -> None:
    payload = {"command": "add", "args": ["a" * MIB]}
    assert_refused(queue, "payload", "add", payload)


def test_validate_payload_returns_the_stored_compact_text() -> None:
    text = validate_payload({"command": "add", "args": ["é"], "kwargs": {"a": 1}})
    assert text == '{"command":"add","args":["é"],"kwargs":{"a":1}}'


# -- job type and enqueue options ----------------------------------------------------------


@pytest.mark.parametrize("job_type", ["", "   ", None, 5, ["add"], "x" * 201, "bad\udcff"])
def test_invalid_job_type_is_refused(queue: JobQueue, job_type: Any) -> None:
    assert_refused(queue, "job_type", job_type, {})


INVALID_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("priority-str", {"priority": "1"}, "priority"),
    ("priority-float", {"priority": 1.5}, "priority"),
    ("priority-true", {"priority": True}, "priority"),
    ("priority-false", {"priority": False}, "priority"),
    ("priority-empty-str", {"priority": ""}, "priority"),
    ("priority-huge", {"priority": 2**63}, "priority"),
    ("delay-negative", {"delay": -1}, "delay"),
    ("delay-negative-small", {"delay": -0.001}, "delay"),
    ("delay-nan", {"delay": math.nan}, "delay"),
    ("delay-inf", {"delay": math.inf}, "delay"),
    ("delay-bad-str", {"delay": "5x"}, "delay"),
    ("delay-negative-str", {"delay": "-1"}, "delay"),
    ("delay-true", {"delay": True}, "delay"),
    ("delay-false", {"delay": False}, "delay"),
    ("delay-list", {"delay": [1]}, "delay"),
    ("max-retries-negative", {"max_retries": -1}, "max_retries"),
    ("max-retries-float", {"max_retries": 1.0}, "max_retries"),
    ("max-retries-str", {"max_retries": "3"}, "max_retries"),
    ("max-retries-true", {"max_retries": True}, "max_retries"),
    ("timeout-zero", {"timeout": 0}, "timeout"),
    ("timeout-zero-str", {"timeout": "0s"}, "timeout"),
    ("timeout-negative", {"timeout": -5}, "timeout"),
    ("timeout-nan", {"timeout": math.nan}, "timeout"),
    ("timeout-inf", {"timeout": math.inf}, "timeout"),
    ("timeout-bad-str", {"timeout": "abc"}, "timeout"),
    ("timeout-true", {"timeout": True}, "timeout"),
    ("dedupe-empty", {"dedupe_key": ""}, "dedupe_key"),
    ("dedupe-int", {"dedupe_key": 5}, "dedupe_key"),
    ("dedupe-list", {"dedupe_key": ["k"]}, "dedupe_key"),
    ("dedupe-surrogate", {"dedupe_key": "k\udcff"}, "dedupe_key"),
    ("unknown-option", {"retries": 3}, "retries"),
    ("unknown-option-2", {"run_at": 0}, "run_at"),
]


@pytest.mark.parametrize(
    ("options", "field"),
    [pytest.param(o, f, id=i) for i, o, f in INVALID_OPTIONS],
)
def test_invalid_enqueue_option_is_refused(
    queue: JobQueue, options: dict[str, Any], field: str
) -> None:
    assert_refused(queue, field, "t", {"command": "add"}, False, **options)


@pytest.mark.parametrize("parallel", [1, 0, "true", "false", None, 1.0, [True]])
def test_parallel_must_be_a_bool(queue: JobQueue, parallel: Any) -> None:
    assert_refused(queue, "parallel", "t", {}, parallel)


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"priority": -7}, lambda j, t: j.priority == -7),
        ({"priority": None}, lambda j, t: j.priority == 0),
        ({"delay": 0}, lambda j, t: j.run_at == pytest.approx(j.created_at)),
        ({"delay": 30}, lambda j, t: j.run_at == pytest.approx(j.created_at + 30)),
        ({"delay": 0.25}, lambda j, t: j.run_at == pytest.approx(j.created_at + 0.25)),
        ({"delay": "15m"}, lambda j, t: j.run_at == pytest.approx(j.created_at + 900)),
        ({"max_retries": 0}, lambda j, t: j.max_retries == 0),
        ({"timeout": 0.5}, lambda j, t: j.timeout == 0.5),
        ({"timeout": "2h"}, lambda j, t: j.timeout == 7200.0),
        ({"dedupe_key": "k"}, lambda j, t: j.dedupe_key == "k"),
        ({}, lambda j, t: j.max_retries is None and j.timeout is None and j.priority == 0),
    ],
)
def test_valid_enqueue_options_are_stored(
    queue: JobQueue, options: dict[str, Any], check: Any
) -> None:
    job = queue.get_job(queue.enqueue("t", {}, True, **options))
    assert job.parallel is True
    assert check(job, options), job


def test_public_enqueue_refuses_and_writes_nothing(queue_path: str) -> None:
    """Through the module API too (GRAPHITI_QUEUE_PATH points at queue_path)."""
    api.enqueue("seed", {}, silent=True)
    with pytest.raises(InvalidJobError) as info:
        api.enqueue("add", {"command": "add\n"}, silent=True)
    assert info.value.field == "payload.command"
    with pytest.raises(InvalidJobError) as info:
        api.enqueue("add", {"command": "add"}, silent=True, priority="high")
    assert info.value.field == "priority"
    assert count_jobs(queue_path) == 1


def test_refused_first_enqueue_creates_no_database(tmp_path: Any) -> None:
    path = str(tmp_path / "fresh" / "queue.db")
    q = JobQueue(path)
    with pytest.raises(InvalidJobError):
        q.enqueue("t", {"command": "-x"})
    q.close()
    assert not os.path.exists(path)


# -- enqueue_many --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "field"),
    [
        pytest.param(
            [{"job_type": "a", "payload": {}}, {"job_type": "b", "payload": {"command": "x\n"}}],
            "jobs[1].payload.command",
            id="bad-payload",
        ),
        pytest.param(
            [{"job_type": "a", "payload": {}}, {"job_type": "b", "payload": {}, "delay": -1}],
            "jobs[1].delay",
            id="bad-option",
        ),
        pytest.param(
            [{"job_type": "a", "payload": {}, "colour": "red"}],
            "jobs[0].colour",
            id="unknown-option",
        ),
        pytest.param(
            [{"job_type": "a", "payload": {}}, {"job_type": "b", "payload": {}, "parallel": 1}],
            "jobs[1].parallel",
            id="bad-parallel",
        ),
        pytest.param([{"payload": {}}], "jobs[0]", id="no-job-type"),
        pytest.param([{"job_type": "a"}], "jobs[0]", id="no-payload"),
        pytest.param([{"job_type": "a", "payload": {}}, "not a dict"], "jobs[1]", id="not-dict"),
        pytest.param(
            [
                {"job_type": "a", "payload": {}},
                {"job_type": "b", "payload": {"command": "add", "kwargs": {"a: b": 1}}},
            ],
            "jobs[1].payload.kwargs['a: b']",
            id="field-with-colon",
        ),
    ],
)
def test_enqueue_many_refuses_naming_the_item(queue: JobQueue, jobs: list[Any], field: str) -> None:
    with pytest.raises(InvalidJobError) as info:
        queue.enqueue_many(jobs)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"invalid job: {field}: ")
    index = int(field[len("jobs[") : field.index("]")])
    item = jobs[index]
    if isinstance(item, dict) and "job_type" in item and "payload" in item:
        # the problem reads exactly as enqueue() of that one item says it (kept whole, even
        # where the field name itself holds ": ")
        with pytest.raises(InvalidJobError) as single:
            queue.enqueue(**item)
        problem = str(single.value).removeprefix(f"invalid job: {single.value.field}: ")
        assert message == f"invalid job: {field}: {problem}"
    assert count_jobs(queue.location) == 1


# -- retry policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "max_retries", "base", "expected"),
    [
        (1, 3, 10.0, 10.0),
        (2, 3, 10.0, 20.0),
        (3, 3, 10.0, 40.0),
        (4, 3, 10.0, None),
        (5, 3, 10.0, None),
        (1, 0, 10.0, None),
        (1, 1, 0.1, 0.1),
        (2, 1, 0.1, None),
        (5, 10, 0.1, 1.6),
        (10, 10, 1.0, 512.0),
        (1, 3, 0.0, 0.0),
    ],
)
def test_retry_delay(attempt: int, max_retries: int, base: float, expected: float | None) -> None:
    got = retry_delay(attempt, max_retries, base)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [0, -1])
def test_retry_delay_attempts_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, 3, 10.0)


def test_default_policy_runs_a_job_at_most_four_times() -> None:
    delays = [retry_delay(k, 3, 10.0) for k in range(1, 5)]
    assert delays == [10.0, 20.0, 40.0, None]


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0.1", 0.1),
        ("0", 0.0),
        ("90", 90.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("0.5m", 30.0),
        (".5", 0.5),
        (" 30s ", 30.0),
        (0.1, 0.1),
        (90, 90.0),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "5x",
        "-1",
        "1.2.3",
        "s",
        "m5",
        "5 m",
        "5ms",
        "5S",
        "1e3",
        "inf",
        "nan",
        "+5",
        "5s5",
        "٣",  # an Arabic-Indic digit: int() would accept it, a duration must not
        -1,
        math.nan,
        True,
    ],
)
def test_parse_duration_refuses(text: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, "GRAPHITI_QUEUE_LEASE")
    assert "GRAPHITI_QUEUE_LEASE" in str(info.value)


# -- settings precedence: option > environment > default -----------------------------------

PRECEDENCE: list[tuple[str, str, str, Any, Any, Any]] = [
    # field, environment variable, its raw value, parsed env value, option value, default
    ("max_retries", "GRAPHITI_QUEUE_MAX_RETRIES", "7", 7, 5, 3),
    ("max_retries", "GRAPHITI_QUEUE_MAX_RETRIES", "0", 0, 1, 3),
    ("backoff_base", "GRAPHITI_QUEUE_BACKOFF_BASE", "0.1", 0.1, 2.0, 10.0),
    ("backoff_base", "GRAPHITI_QUEUE_BACKOFF_BASE", "2m", 120.0, 2.0, 10.0),
    ("capacity", "GRAPHITI_QUEUE_CAPACITY", "5", 5, 9, 100),
    ("workers", "GRAPHITI_QUEUE_WORKERS", "8", 8, 2, 4),
    ("job_timeout", "GRAPHITI_QUEUE_JOB_TIMEOUT", "15m", 900.0, 5.0, 600.0),
    ("grace", "GRAPHITI_QUEUE_GRACE", "1h", 3600.0, 1.0, 30.0),
    ("lease", "GRAPHITI_QUEUE_LEASE", "90", 90.0, 10.0, 60.0),
    ("host_id", "GRAPHITI_QUEUE_HOST_ID", "box-a", "box-a", "box-b", None),
    ("program", "GRAPHITI_BIN", "/opt/graphiti", "/opt/graphiti", "/usr/bin/g", "graphiti"),
    ("start_method", "GRAPHITI_QUEUE_START_METHOD", "spawn", "spawn", "fork", "forkserver"),
    ("imports", "GRAPHITI_QUEUE_IMPORTS", "a.b, c,,d ", ("a.b", "c", "d"), ("x",), ()),
]


@pytest.mark.parametrize(
    ("field", "var", "raw", "from_env", "option", "default"),
    PRECEDENCE,
    ids=[f"{p[0]}-{p[2]}" for p in PRECEDENCE],
)
def test_settings_precedence(
    field: str, var: str, raw: str, from_env: Any, option: Any, default: Any
) -> None:
    base_env = {"XDG_STATE_HOME": "/state"}
    env = {**base_env, var: raw}

    got_default = getattr(load_settings(env=base_env), field)
    if default is None:  # host_id: the host name
        import socket

        default = socket.gethostname()
    assert got_default == default
    # an empty variable counts as unset
    assert getattr(load_settings(env={**base_env, var: ""}), field) == default
    assert getattr(load_settings(env=env), field) == from_env
    assert getattr(load_settings(env=env, **{field: option}), field) == option
    assert getattr(load_settings(env=base_env, **{field: option}), field) == option
    # an option of None means "not given"
    assert getattr(load_settings(env=env, **{field: None}), field) == from_env


def test_queue_location_precedence(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"XDG_STATE_HOME": "/state", "GRAPHITI_QUEUE_PATH": "/env/q.db"}
    assert load_settings("/opt/q.db", env=env).location == "/opt/q.db"
    assert load_settings(env=env).location == "/env/q.db"
    assert load_settings(env={"XDG_STATE_HOME": "/state"}).location == (
        "/state/graphiti_mpq/queue.db"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(env={"HOME": str(tmp_path)}).location == str(
        tmp_path / ".local" / "state" / "graphiti_mpq" / "queue.db"
    )
    # a relative path is made absolute; a postgres URL is kept as given
    monkeypatch.chdir(tmp_path)
    assert load_settings("rel.db", env={}).location == str(tmp_path / "rel.db")
    url = "postgresql://u@h/db"
    assert load_settings(url, env=env).location == url
    assert load_settings(env={"GRAPHITI_QUEUE_PATH": url}).location == url


def test_settings_defaults_match_the_contract() -> None:
    s = load_settings(env={"XDG_STATE_HOME": "/state"})
    assert isinstance(s, Settings)
    assert (s.max_retries, s.backoff_base, s.capacity, s.workers) == (3, 10.0, 100, 4)
    assert (s.job_timeout, s.grace, s.lease, s.start_method) == (600.0, 30.0, 60.0, "forkserver")
    assert (s.program, s.imports) == ("graphiti", ())


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("GRAPHITI_QUEUE_MAX_RETRIES", "-1"),
        ("GRAPHITI_QUEUE_MAX_RETRIES", "three"),
        ("GRAPHITI_QUEUE_MAX_RETRIES", "1.5"),
        ("GRAPHITI_QUEUE_BACKOFF_BASE", "5x"),
        ("GRAPHITI_QUEUE_BACKOFF_BASE", "-1"),
        ("GRAPHITI_QUEUE_CAPACITY", "0"),
        ("GRAPHITI_QUEUE_WORKERS", "0"),
        ("GRAPHITI_QUEUE_WORKERS", "many"),
        ("GRAPHITI_QUEUE_JOB_TIMEOUT", "1.2.3"),
        ("GRAPHITI_QUEUE_GRACE", "abc"),
        ("GRAPHITI_QUEUE_LEASE", "10 s"),
        ("GRAPHITI_QUEUE_START_METHOD", "threads"),
        ("GRAPHITI_QUEUE_HOST_ID", "   "),
    ],
)
def test_bad_environment_value_is_a_usage_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"XDG_STATE_HOME": "/state", var: raw})
    assert var in str(info.value)
    assert info.value.exit_code == 2
