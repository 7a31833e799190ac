"""Where importers report what they inferred, unwrapped, resampled or dropped, so that nothing happens silently."""

from __future__ import annotations

import logging
from collections.abc import Callable

LogFn = Callable[[str], None]

_logger = logging.getLogger("vitkit.weights")


class Reporter:
    """Send messages to a user callback (e.g. `print`), or to the `vitkit.weights` logger when there is none.

    Args:
        log: called with each message; None routes `info` to logging INFO and `warn` to logging WARNING.
    """

    def __init__(self, log: LogFn | None = None):
        self._log = log

    @property
    def silent(self) -> bool:
        """True when no callback was given (messages go to the logger, which shows only warnings by default)."""
        return self._log is None

    def info(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        else:
            _logger.info(msg)

    def warn(self, msg: str) -> None:
        """A message about something the user may not expect (e.g. weights that were left out)."""
        if self._log is not None:
            self._log(f"warning: {msg}")
        else:
            _logger.warning(msg)


def as_reporter(log: LogFn | Reporter | None) -> Reporter:
    return log if isinstance(log, Reporter) else Reporter(log)
