"""What the console shows: progress lines with a stage prefix (``say``) and a one-line progress
display for long work (``Progress``: done/total, rate and time left). Both go to stderr, so a
job's results on stdout stay clean; diagnostic detail goes through ``logging`` (``drray -v``).
A ``drray run`` also writes everything, with tracebacks and Ray's banners, to ``RUN/drray.log``."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

# The log line format of every drray process (the CLI, and a submitted job's own process).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Records for the log file only (tracebacks, libraries' notices): never on the console.
_LOG_FILE_ONLY = "drray.log_file"
logging.getLogger(_LOG_FILE_ONLY).propagate = False


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


@contextlib.contextmanager
def log_to_file(path):
    """While inside, also write every log record (and the records meant for the log only) to
    ``path``, appended: a run's log is ``RUN/drray.log``, the place a console line points to."""
    from pathlib import Path

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    loggers = (logging.getLogger(), logging.getLogger(_LOG_FILE_ONLY))
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield path
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def log_only(text: str, exc_info=None) -> None:
    """``text`` (and a traceback) into the log file, not on the console."""
    logging.getLogger(_LOG_FILE_ONLY).error(text, exc_info=exc_info)


class _ToLogFile(logging.Filter):
    """At the logger where a record is made: hand it to the log file, keep it off the console
    (every record, or those whose message starts with ``prefix``)."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        logging.getLogger(_LOG_FILE_ONLY).handle(record)
        return False


def keep_off_console(logger_name: str, prefix: str = "") -> None:
    """A library's notices that say nothing about the work (Ray's start-up banners): log file
    only; with ``prefix``, only the notices that start with it."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _ToLogFile) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_ToLogFile(prefix))


def say(prefix: str, text: str) -> None:
    """A progress or warning line on the console: ``[prefix] text``, the one format every job uses."""
    print(f"[{prefix}] {text}", file=sys.stderr, flush=True)
    logging.getLogger(_LOG_FILE_ONLY).info("[%s] %s", prefix, text)  # the run log has it too


class Progress:
    """Call with (done, total); redraws one line on a terminal, prints every 10% otherwise."""

    def __init__(self, label: str, stream=None, unit: str = "img"):
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        left = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / total if total else 100.0
        line = (f"{self.label}: {done}/{total} ({pct:.0f}%) {rate:.1f} {self.unit}/s"
                + (f", {left:.0f} s left" if done < total and left != float("inf") else ""))
        if self.tty:
            if now - self._last_draw > 0.2 or done >= total:
                self.stream.write("\r\033[K" + line + ("\n" if done >= total else ""))
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(pct // 10)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()
