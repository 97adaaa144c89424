"""Heartbeat: the training loops tell whoever listens how many optimizer steps they took.

A grid's progress bar counts stored runs, and a stack of permuted-MNIST runs trains for most
of an hour before it stores any. So both training loops (:func:`masq.training.train_task` and
the stacked loop) call :func:`beat` once per step, and a caller that wants to follow a long
computation installs a listener for the duration of a ``with`` block::

    with heartbeat.listening(lambda steps: print(steps)):
        protocol.continue_stacked(...)

Without a listener :func:`beat` does nothing. The listener lives in a context variable, so it
is this thread's (and this process's) alone: pool workers install their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Listener = Callable[[int], None]

_LISTENER: ContextVar[Listener | None] = ContextVar("masq_heartbeat", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(steps)`` at every :func:`beat` inside the ``with`` block."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def beat(steps: int = 1) -> None:
    """``steps`` optimizer steps were taken (one step of a stack of K runs counts once)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(steps)


def restored(steps: int) -> None:
    """``steps`` optimizer steps that a resumed computation took before it stopped (restored
    from its phase checkpoint, not taken now): told to the listener's ``restored`` method
    where it has one (a progress bar shows them but leaves them out of its rate), else
    counted as :func:`beat` counts them."""
    listener = _LISTENER.get()
    if listener is not None:
        getattr(listener, "restored", listener)(steps)
