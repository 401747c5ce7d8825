"""Quiet console (her2ray's lines on the terminal, everything else in the log) and `her2ray doctor`."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading

from her2ray import console


def test_quiet_console_routes_fd_level_and_library_output_to_the_log(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)   # Python's own, not pytest's
    log_path = tmp_path / "out" / "logs" / "x-ray.log"
    with console.QuietConsole(str(log_path)) as qc:
        print("her2ray result line")                                      # sys.stdout: terminal
        logging.getLogger("her2ray.features").warning("a warning that matters")
        logging.getLogger("ray.data").warning("Progress bars disabled")   # another library: log only
        os.write(2, b"[core_worker.cc:2465] C++ noise\n")                 # fd 2 (what glog writes to)
        print("(raylet) worker pool noise", file=sys.stderr)              # Python stderr: log only
        t = threading.Thread(target=lambda: 1 / 0, name="PlacementGroupCleanerMonitor")
        t.start()
        t.join()                                                          # thread traceback: log only
        subprocess.run([sys.executable, "-c", "import sys; print('child to log'); sys.stderr.write('child err\\n')"])
        subprocess.run([sys.executable, "-c", "print('child stage line')"], **console.child_stdio())
        print("progress bar", file=console.stderr())
        assert console.child_env({})[console.LOG_ENV] == str(log_path)
    captured = capfd.readouterr()
    terminal = captured.out + captured.err
    for line in ("her2ray result line", "a warning that matters", "child stage line", "progress bar",
                 f"Ray and library output: {log_path}"):
        assert line in terminal, line
    for noise in ("Progress bars disabled", "core_worker", "raylet", "ZeroDivisionError", "child to log",
                  "child err"):
        assert noise not in terminal, noise
    text = log_path.read_text()
    for line in ("Progress bars disabled", "C++ noise", "worker pool noise", "ZeroDivisionError",
                 "PlacementGroupCleanerMonitor", "child to log", "child err", "a warning that matters"):
        assert line in text, line
    # everything restored: fds, streams, root logger
    assert console.active() is None and console.stderr() is sys.stderr
    os.write(1, b"after\n")
    assert "after" in capfd.readouterr().out


def test_a_library_handler_whose_stream_was_closed_does_not_break_the_console(tmp_path):
    """Seen in the suite: Ray's handler still held a captured stderr that had been closed since; moving it to
    the log raised ``I/O operation on closed file`` from ``setStream``'s flush and the command died."""
    dead = open(tmp_path / "captured-stderr.txt", "w")     # noqa: SIM115 - closed below on purpose
    handler = logging.StreamHandler(dead)
    lib = logging.getLogger("somelib.closed_stream")
    lib.addHandler(handler)
    dead.close()
    try:
        with console.QuietConsole(str(tmp_path / "logs" / "x.log")):
            lib.warning("into the log")
        assert "into the log" in (tmp_path / "logs" / "x.log").read_text()
        assert handler.stream is dead                                   # restored as it was
    finally:
        lib.removeHandler(handler)


def test_doctor_reports_settings_but_never_secret_values(monkeypatch, tmp_path, capsys):
    from her2ray.cli import main

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEID123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000")
    monkeypatch.setenv("HER2RAY_SLIDE_CACHE", str(tmp_path / "cache"))
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert main(["doctor", "--address", f"127.0.0.1:{port}", "--timeout", "2"]) == 0
        up = capsys.readouterr().out
    assert main(["doctor", "--address", f"127.0.0.1:{port}", "--timeout", "2"]) == 0
    down = capsys.readouterr().out
    for text in (up, down):
        assert secret not in text and "AKIAEXAMPLEID123" not in text and "10.1.2.3" not in text
        assert "AWS_SECRET_ACCESS_KEY" in text and "custom, via AWS_ENDPOINT_URL" in text
        for what in ("her2ray ", "torch ", "ray ", "openslide ", "open_clip ", "slide cache"):
            assert what in text, what
        assert str(tmp_path / "cache") in text
    assert f"127.0.0.1:{port} reachable" in up and "NOT reachable" in down
