"""Termination signals during a conversion: they unwind through the clean-up, or wait while the output moves into place."""

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
    """SIGTERM and SIGHUP (kill, timeout, batch schedulers) raise `Interrupted` while the block runs."""

    def handler(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)}
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
