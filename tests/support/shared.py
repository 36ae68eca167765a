"""Small pieces the test servers and proxies share (only the standard library, like faultproxy).

- :class:`StartStop`: ``with thing:`` starts it and stops it, for anything with ``start``/``stop``.
- :class:`CallGate`: the calls a hold caught wait in it until the test releases them, forwarded or
  failed; the proxies' holds (``faultproxy.Hold``, ``crashkit.VaultHold``) are built on it.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Self


class StartStop:
    """A context manager over ``start()`` and ``stop()``: entered, started; left, stopped."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class CallGate:
    """Caught calls wait here until :meth:`release`; then they go on, forwarded or failed.

    The proxy calls ``_arrive`` when it catches a call, ``_wait`` (True: forward it) before
    forwarding, and ``_finish`` once the call is done, whatever became of it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._arrived = 0
        self._finished = 0
        self._released = False
        self._forward = True

    @property
    def arrived(self) -> int:
        """How many calls this hold has caught so far."""
        with self._cond:
            return self._arrived

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def wait_arrived(self, timeout: float = 10.0, calls: int = 1) -> bool:
        """Block until ``calls`` calls are in the proxy, held; False if the timeout passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._arrived >= calls, timeout)

    def release(self, forward: bool = True) -> None:
        """Let the held calls go on; ``forward=False`` fails them (connection closed, no answer)."""
        with self._cond:
            if not self._released:
                self._released = True
                self._forward = forward
            self._cond.notify_all()

    def wait_finished(self, timeout: float = 10.0) -> bool:
        """After :meth:`release`, block until every caught call is done (answered or failed)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._released and self._arrived > 0 and self._finished == self._arrived,
                timeout,
            )

    def _arrive(self) -> None:
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()

    def _wait(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._released)
            return self._forward

    def _finish(self) -> None:
        with self._cond:
            self._finished += 1
            self._cond.notify_all()
