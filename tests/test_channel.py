"""The driver-to-worker socket channel (no Ray): order, errors, and a worker that dies."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt_dist import channel
from apt_dist.worker import ContextMissing

KEY = b"k" * 32


def _address(tmp_path, name="w0"):
    return str(tmp_path / name)


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


def handler(kind, value):
    if kind == "sleep":
        time.sleep(value)
        return value
    if kind == "context":
        raise ContextMissing("no context")
    if kind == "unpicklable":
        raise Unpicklable("x")
    raise ValueError(f"bad kind {kind}")


def test_replies_come_back_in_call_order_and_wait_returns_the_done_ones(tmp_path):
    a = _address(tmp_path)
    channel.serve(a, KEY, handler)
    ch = channel.Channel(a, KEY)
    calls = [ch.call("sleep", 0.05), ch.call("sleep", 0.0), ch.call("sleep", 0.01)]
    done = []
    deadline = time.time() + 10
    while len(done) < 3 and time.time() < deadline:
        done += channel.wait([c for c in calls if c not in done], timeout=1.0)
    assert done == calls  # one worker answers in order
    assert [c.result() for c in calls] == [0.05, 0.0, 0.01]
    ch.close()


def test_wait_times_out_with_nothing_done(tmp_path):
    a = _address(tmp_path)
    channel.serve(a, KEY, handler)
    ch = channel.Channel(a, KEY)
    c = ch.call("sleep", 0.5)
    t0 = time.perf_counter()
    assert channel.wait([c], timeout=0.05) == []
    assert time.perf_counter() - t0 < 0.4
    assert channel.wait([c], timeout=5.0) == [c] and c.result() == 0.5
    ch.close()


def test_worker_exceptions_keep_their_type_and_traceback(tmp_path):
    a = _address(tmp_path)
    channel.serve(a, KEY, handler)
    ch = channel.Channel(a, KEY)
    c1, c2, c3 = ch.call("context", 0), ch.call("nope", 0), ch.call("unpicklable", 0)
    for c in (c1, c2, c3):
        while not c.done:
            channel.wait([c], timeout=5.0)
    with pytest.raises(ContextMissing) as e:
        c1.result()
    assert "in the worker" in str(e.value.__cause__) and "handler" in str(e.value.__cause__)
    with pytest.raises(ValueError, match="bad kind nope"):
        c2.result()
    with pytest.raises(channel.RemoteError, match="did not pickle") as e3:
        c3.result()
    assert "Unpicklable" in str(e3.value)  # the worker's own traceback, not the pickling error's
    assert ch.call("sleep", 0.0) is not None  # the channel still works after errors
    ch.close()


def test_a_wrong_authkey_is_refused_and_the_driver_still_gets_in(tmp_path):
    a = _address(tmp_path)
    channel.serve(a, KEY, handler)
    with pytest.raises(multiprocessing.AuthenticationError):
        channel.Channel(a, b"x" * 32)
    ch = channel.Channel(a, KEY)
    c = ch.call("sleep", 0.0)
    assert channel.wait([c], timeout=5.0) == [c] and c.result() == 0.0
    ch.close()


def test_a_worker_that_dies_fails_its_pending_calls_and_later_ones(tmp_path):
    """A SIGKILLed worker process: every pending call, and every later call, fails with ChannelClosed."""
    a = _address(tmp_path)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from apt_dist import channel; "
            "channel.serve(sys.argv[1], b'k' * 32, lambda s: time.sleep(s) or s); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, a, str(root)])
    try:
        deadline = time.time() + 30
        while not os.path.exists(a) and time.time() < deadline:
            time.sleep(0.05)
        ch = channel.Channel(a, KEY, name="worker 7")
        ok = ch.call(0.0)
        assert channel.wait([ok], timeout=10.0) == [ok] and ok.result() == 0.0
        pending = [ch.call(30.0), ch.call(0.0)]
        os.kill(proc.pid, signal.SIGKILL)
        done = []
        while len(done) < 2 and time.time() < deadline:
            done += channel.wait([c for c in pending if c not in done], timeout=1.0)
        for c in pending:
            with pytest.raises(channel.ChannelClosed, match="worker 7"):
                c.result()
        later = ch.call(0.0)
        assert later.done
        with pytest.raises(channel.ChannelClosed):
            later.result()
    finally:
        proc.kill()
        proc.wait()


def test_stray_peers_neither_kill_nor_block_the_listener(tmp_path):
    """A peer that connects and closes, one that sends garbage, one that says nothing: the driver still gets in."""
    import socket

    a = _address(tmp_path)
    thread = channel.serve(a, KEY, handler, handshake_timeout_s=1.0)
    silent = socket.socket(socket.AF_UNIX)
    try:
        closes = socket.socket(socket.AF_UNIX)
        closes.connect(a)
        closes.close()
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(a)
        garbage.sendall(b"\xff" * 64)
        silent.connect(a)  # holds the listener for its handshake timeout at most
        t0 = time.monotonic()
        ch = channel.Channel(a, KEY, timeout_s=10.0)
        c = ch.call("sleep", 0.0)
        assert channel.wait([c], timeout=5.0) == [c] and c.result() == 0.0
        assert time.monotonic() - t0 < 5.0 and thread.is_alive()
        garbage.close()
        ch.close()
    finally:
        silent.close()


def test_connecting_to_a_listener_that_never_answers_times_out(tmp_path):
    import socket

    a = _address(tmp_path)
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(a)
        mute.listen(1)  # accepts into the backlog, never handshakes
        t0 = time.monotonic()
        with pytest.raises(OSError):
            channel.Channel(a, KEY, timeout_s=1.0)
        assert time.monotonic() - t0 < 5.0
