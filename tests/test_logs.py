"""The log sink: one write per line, or one per batch while lines are held."""

from __future__ import annotations

import calendar
import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from graphiti_mpq import logs


class _CountingStream(io.StringIO):
    """A text stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[_CountingStream]:
    out = _CountingStream()
    logs.configure_logging("json", "info", out)
    yield out
    structlog.reset_defaults()


def _events(out: _CountingStream) -> list[str]:
    return [json.loads(line)["event"] for line in out.getvalue().splitlines()]


def test_a_line_is_written_at_once_outside_a_batch(stream: _CountingStream) -> None:
    log = logs.get_logger(kind="test")
    log.info("first")
    assert _events(stream) == ["first"]
    log.warning("second", n=2)
    assert _events(stream) == ["first", "second"]
    assert len(stream.writes) == 2
    line = json.loads(stream.getvalue().splitlines()[1])
    assert (line["kind"], line["n"], line["level"]) == ("test", 2, "warning")


def test_held_lines_go_out_together_in_order_when_the_batch_ends(
    stream: _CountingStream,
) -> None:
    log = logs.get_logger()
    log.info("before")
    with logs.held_lines():
        for i in range(5):
            log.info("job_completed", i=i)
        with logs.held_lines():  # nested: the outer batch writes them
            log.info("inner")
        assert _events(stream) == ["before"]
    assert _events(stream) == ["before", *["job_completed"] * 5, "inner"]
    assert len(stream.writes) == 2
    log.info("after")
    assert _events(stream)[-1] == "after" and len(stream.writes) == 3


def test_held_lines_are_written_when_the_batch_fails(stream: _CountingStream) -> None:
    log = logs.get_logger()
    with pytest.raises(RuntimeError), logs.held_lines():
        log.info("recorded")
        raise RuntimeError("boom")
    assert _events(stream) == ["recorded"]


def test_timestamps_are_iso_utc_with_microseconds(stream: _CountingStream) -> None:
    log = logs.get_logger()
    before = time.time()
    for _ in range(3):
        log.info("tick")
    after = time.time()
    for line in stream.getvalue().splitlines():
        stamp = json.loads(line)["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        seconds += int(stamp[20:26]) / 1e6
        assert before - 1e-5 <= seconds <= after + 1e-5


def test_values_json_cannot_hold_are_written_as_their_repr(stream: _CountingStream) -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    logs.get_logger().info("odd", where=Opaque(), text="naïve \n line", items=[1, None, 2.5])
    (line,) = stream.getvalue().splitlines()  # one line, whatever the values hold
    event = json.loads(line)
    assert (event["where"], event["text"], event["items"]) == (
        "<opaque>",
        "naïve \n line",
        [1, None, 2.5],
    )


def test_a_child_forked_while_lines_are_held_writes_its_own_at_once(
    stream: _CountingStream, tmp_path: Path
) -> None:
    out = tmp_path / "child.log"
    with out.open("w") as sink:
        logs.configure_logging("json", "info", sink)
        log = logs.get_logger()
        with logs.held_lines():
            log.info("parent_held")
            pid = os.fork()
            if pid == 0:  # the child: its line must reach the file before it exits
                try:
                    log.info("child_line")
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
            assert [json.loads(x)["event"] for x in out.read_text().splitlines()] == ["child_line"]
    events = [json.loads(x)["event"] for x in out.read_text().splitlines()]
    assert events == ["child_line", "parent_held"]


def test_a_large_batch_goes_out_in_whole_lines_of_at_most_a_pipes_atomic_write(
    stream: _CountingStream,
) -> None:
    log = logs.get_logger()
    with logs.held_lines():
        for i in range(100):
            log.info("job_completed", job_id=f"{i:028x}", padding="x" * 150)
    assert _events(stream) == ["job_completed"] * 100
    assert 1 < len(stream.writes) < 100
    for text in stream.writes:
        assert len(text.encode()) <= 4096 and text.endswith("\n")
