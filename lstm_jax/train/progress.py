"""The progress bar on stderr and the ``metrics.jsonl`` log."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLog", "ProgressBar", "format_duration", "read_metrics"]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``step 1200/3000 [#####.....] 40% | loss 0.0123 | 45.2 steps/s | ETA 0:40`` on stderr.

    On a terminal the line redraws in place at most a few times a second; elsewhere (a log file,
    a CI job) a plain line is printed every ``every`` steps so logs stay readable.
    """

    def __init__(self, total: int, start: int, *, enabled: bool = True, every: int = 50,
                 stream: TextIO | None = None):
        self.total, self.start = total, start
        self.enabled, self.every = enabled, max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0: float | None = None  # set after the first step, so compilation is not counted
        self._step0 = start
        self._last_draw = 0.0
        self._drawn = False

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        if self.tty:
            if now - self._last_draw < 0.2 and step != self.total:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(step, loss, now) + "\x1b[K")
            self._drawn = True
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self._line(step, loss, now) + "\n")
        self.stream.flush()

    def _line(self, step: int, loss: float, now: float) -> str:
        done = step - self._step0
        rate = done / (now - self._t0) if self._t0 is not None and now > self._t0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        return (f"step {step}/{self.total} [{bar}] {100 * frac:3.0f}% | loss {loss:.4f} | "
                f"{rate:.1f} steps/s | ETA {format_duration(eta)}")

    def close(self) -> None:
        """End the redrawn line so that the next message starts on a fresh one."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def message(self, text: str, stream: TextIO | None = None) -> None:
        """Print a line without garbling the bar."""
        self.close()
        print(text, file=stream or sys.stdout, flush=True)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per event (``step``, ``split``, metrics,
    ``time``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop events past ``step`` (written after the checkpoint a run resumes from) and any
        torn last line, so a resumed run's log matches an uninterrupted one."""
        if not self.path.exists():
            return
        keep = [json.dumps(r, allow_nan=True) for r in read_metrics(self.path)
                if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete events of a ``metrics.jsonl`` (a line torn by a kill is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
