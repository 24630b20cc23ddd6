"""Interrupts handled as Python's default, even where the shell started us ignoring them.

A non-interactive shell starts background jobs with SIGINT ignored, and an ignored signal stays
ignored across exec. Dagster maps SIGTERM to whatever handles SIGINT, so every Dagster process
(and every in-process execution, which re-installs that mapping when it ends) would then ignore
SIGTERM as well: an operator's or a supervisor's stop would wait for its time-out and kill.
"""

import signal


def handle_interrupts() -> None:
    """Restore Python's own SIGINT handler if SIGINT is ignored (before any child starts, so
    children inherit a signal that they can handle)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
