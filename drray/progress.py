"""What the console shows: progress lines with a stage prefix (``say``) and a one-line progress
display for long work (``Progress``: done/total, rate and time left). Both go to stderr, so a
job's results on stdout stay clean; diagnostic detail goes through ``logging`` (``drray -v``)."""

from __future__ import annotations

import sys
import time

# The log line format of every drray process (the CLI, and a submitted job's own process).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def say(prefix: str, text: str) -> None:
    """A progress or warning line on the console: ``[prefix] text``, the one format every job uses."""
    print(f"[{prefix}] {text}", file=sys.stderr, flush=True)


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
