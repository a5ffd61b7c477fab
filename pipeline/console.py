"""What `vnca run-local` shows in the terminal while kfp.local runs the pipeline.

kfp.local prints everything to `sys.stdout`: its own log records, each task's executor input
and output, and every line a task's subprocess writes (library logs, tqdm bars, whose `\\r`
updates arrive as separate lines). `StepConsole` stands in for `sys.stdout` during a run:

- every line goes to the run's log file, untouched;
- the terminal gets one line when a step starts, one when it ends (with its time and status),
  and the step's progress bars as one bar that updates in place (on a terminal) or a line every
  25 % (in a log); with `verbose` it also gets every other line, as kfp printed it;
- a failed step's last lines are shown, so its own error is on screen without `--verbose`.

`StepConsole.times` holds each finished step's (name, seconds, status) for the summary.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# A tqdm refresh: "desc:  45%|####5     | 180/400 [00:31<00:37,  5.80step/s, loss=1.2]"
BAR = re.compile(r"^\s*(?P<desc>[^|]*?):\s+(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)"
                 r"\s*\[(?P<times>[^\]]*)\]")
TAIL_LINES = 15


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepConsole:
    """A file-like stand-in for sys.stdout that filters kfp.local's output (see module doc)."""

    def __init__(self, terminal: TextIO, log: TextIO, verbose: bool = False):
        self.terminal, self.log, self.verbose = terminal, log, verbose
        self.is_tty = bool(getattr(terminal, "isatty", lambda: False)())
        self.times: list[tuple[str, float, str]] = []
        self._buf = ""
        self._step: str | None = None
        self._t0 = time.perf_counter()
        self._bar_shown = False
        self._last_quarter: dict[str, int] = {}
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    # -- file protocol -----------------------------------------------------------------------
    def write(self, text: str) -> int:
        self.log.write(text)
        self._buf += text
        *lines, self._buf = re.split(r"\r\n|\r|\n", self._buf)
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return False  # kfp and tqdm must not draw for a terminal through this object

    # -- lines -------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self._bar_shown:
            self.terminal.write("\r\x1b[2K")
            self._bar_shown = False
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw).rstrip()
        if (m := STARTED.search(line)) and not BAR.match(line):
            self._start(m.group(1))
            return
        if m := FINISHED.search(line):
            self._finish(m.group(1), m.group(2))
            return
        if m := BAR.match(line):
            self._bar(m)
            return
        if line.strip():
            self._tail.append(line.strip())
        if self.verbose:
            self._say(raw.rstrip("\n"))

    def _start(self, name: str) -> None:
        self._step, self._t0 = name, time.perf_counter()
        self._tail.clear()
        self._last_quarter.clear()
        self._say(f"{time.strftime('%H:%M:%S')}  {name} ...")

    def _finish(self, name: str, status: str) -> None:
        seconds = time.perf_counter() - self._t0
        self.times.append((name, seconds, status))
        mark = "done" if status == "SUCCESS" else status
        self._say(f"{time.strftime('%H:%M:%S')}  {name} {mark} in {format_seconds(seconds)}")
        if status != "SUCCESS" and not self.verbose:
            for line in self._tail:
                self._say(f"    | {line}")
        self._step = None

    def _bar(self, m: re.Match) -> None:
        desc, n, total = m.group("desc").strip(), int(m.group("n")), int(m.group("total"))
        pct = int(m.group("pct"))
        elapsed = m.group("times").split(",")[0]
        text = f"    {desc}: {pct:3d}% {n}/{total} [{elapsed}]"
        if self.verbose:
            self._say(text)
        elif self.is_tty:
            self.terminal.write("\r\x1b[2K" + text)
            self.terminal.flush()
            self._bar_shown = True
        else:
            # In a log: long bars every 25 %, short ones (under 20 units) once, when done.
            quarter = pct // 25 if total >= 20 else 4 * (n >= total)
            if quarter > self._last_quarter.get(desc, -1 if total >= 20 else 0):
                self._last_quarter[desc] = quarter
                self._say(text)
