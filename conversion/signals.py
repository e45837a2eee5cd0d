"""Termination signals during a conversion: they unwind through the clean-up, or wait while the output moves into place.

A signal the conversion inherits as ignored stays ignored, as POSIX asks of programs that catch signals: a shell
starts background jobs (`cmd &` without job control) with SIGINT ignored and `nohup` starts its command with SIGHUP
ignored, so that Ctrl-C at the terminal, or the terminal closing, does not stop them. Such a conversion runs to the
end; `kill` (SIGTERM, unless that too was ignored) stops it, and nothing is left behind. Python itself leaves an
inherited ignored SIGINT ignored (no KeyboardInterrupt); `termination_unwinds` does the same for SIGTERM and SIGHUP.
"""

import contextlib
import signal
import threading


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) arrived: unwinds through the clean-up as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def termination_unwinds():
    """SIGTERM and SIGHUP (kill, timeout, batch schedulers) raise `Interrupted` while the block runs; one that the
    process inherited as ignored (`nohup` ignores SIGHUP) stays ignored."""

    def handler(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [number for number in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(number) != signal.SIG_IGN]
    previous = {number: signal.signal(number, handler) for number in caught}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def signals_held():
    """Signals that end the process wait until the block is done."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
