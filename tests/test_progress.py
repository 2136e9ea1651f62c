"""``megatron_ucp.progress``: a byte progress bar drawn only on a terminal, silent everywhere else."""

import io
import os
import threading

from megatron_ucp.progress import byte_progress, is_terminal


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal(capsys):
    stream = io.StringIO()
    with byte_progress(10_000_000, "converting", enabled=True, file=stream) as bar:
        bar.update(4_000_000)
        bar.update(6_000_000)
    assert not bar.shown and stream.getvalue() == ""
    assert bar.done == 10_000_000  # counted all the same
    with byte_progress(100, "converting") as bar:  # the default stream: pytest's capture, not a terminal
        bar.update(100)
    assert not bar.shown and capsys.readouterr().err == ""


def test_silent_when_disabled_even_on_a_terminal():
    stream = FakeTerminal()
    with byte_progress(1000, "converting", enabled=False, file=stream) as bar:
        bar.update(1000)
    assert not bar.shown and stream.getvalue() == "" and bar.done == 1000


def test_shows_bytes_and_rate_on_a_terminal():
    stream = FakeTerminal()
    bar = byte_progress(10_000_000, "converting", file=stream)
    assert bar.shown
    bar.update(2_500_000)
    bar.update(7_500_000)
    bar.close()
    bar.close()  # idempotent
    text = stream.getvalue()
    assert "converting" in text and "100%" in text
    assert "10.0MB/10.0MB" in text  # bytes done out of the total, decimal units
    assert "B/s" in text  # the rate


def test_draws_on_a_real_terminal_that_reports_no_size():
    """A pty reporting 0 x 0 (``script``, some consoles): tqdm alone would draw nothing there."""
    master, replica = os.openpty()
    try:
        with os.fdopen(replica, "w") as stream:
            assert stream.isatty() and tuple(os.get_terminal_size(replica)) == (0, 0)
            with byte_progress(2000, "sizeless", file=stream) as bar:
                bar.update(2000)
            stream.flush()
        text = ""
        while "2.00kB/2.00kB" not in text:  # the pty hands the writes over in pieces; the replica is closed
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: everything written has been read
                break
            if not chunk:
                break
            text += chunk.decode()
    finally:
        os.close(master)
    assert "sizeless: 100%" in text and "2.00kB/2.00kB" in text


def test_updates_from_threads_are_all_counted():
    bar = byte_progress(8 * 1000, "x", file=io.StringIO())
    threads = [threading.Thread(target=lambda: [bar.update(1) for _ in range(1000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    assert bar.done == 8000


def test_is_terminal_tolerates_odd_streams():
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(None) and not is_terminal(closed) and not is_terminal(object())  # type: ignore[arg-type]
    assert is_terminal(FakeTerminal())
