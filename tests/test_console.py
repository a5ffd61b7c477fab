"""What `vnca run-local` prints while kfp.local runs: one line per step start and end, progress
bars, a failed step's last lines; everything to the log file untouched."""

import io

from vnca_pipeline.console import StepConsole, format_seconds

KFP_LINES = [
    "\x1b[36m2026-12-02 06:23:37.031 - INFO - Executing task 'train-doubling'\x1b[0m",
    "    [KFP Executor 2026-12-02 06:23:40,001 INFO]: Looking for component `train`",
    '    {"inputs": {"parameterValues": {"config": "..."}}, "outputs": {}}',
]


class Tty(io.StringIO):
    def isatty(self):
        return True


def _feed(console, text):
    console.write(text)
    console.flush()


def test_steps_bars_and_chatter(tmp_path):
    term, log = io.StringIO(), io.StringIO()
    c = StepConsole(term, log)
    _feed(c, "\n".join(KFP_LINES) + "\n")
    for n in (0, 10, 26, 50, 74, 75, 100):
        _feed(c, f"    train:  {n:2d}%|###       | {n * 4}/400 [00:{n // 2:02d}<00:30, 3.1step/s,"
                 f" loss=1.0]\r")
    _feed(c, "\n\x1b[32m2026-12-02 06:27:12.5 - INFO - Task 'train-doubling' finished with "
             "status SUCCESS\x1b[0m\n")
    out = term.getvalue().splitlines()
    assert out[0].endswith("  train-doubling ...")
    assert out[-1].split("  ", 1)[1].startswith("train-doubling done in ")
    bars = [line for line in out if "train:" in line]
    # Not a terminal: one line per quarter reached (0, 25, 50, 75, 100 %), not one per refresh.
    assert [b.split("%")[0].split()[-1] for b in bars] == ["0", "26", "50", "75", "100"]
    assert "Looking for component" not in term.getvalue()
    assert "parameterValues" not in term.getvalue()
    # The log keeps every byte kfp printed.
    assert log.getvalue().count("Looking for component") == 1 and "loss=1.0" in log.getvalue()
    assert [(n, s) for n, _, s in c.times] == [("train-doubling", "SUCCESS")]


def test_a_terminal_gets_one_bar_redrawn_in_place():
    term = Tty()
    c = StepConsole(term, io.StringIO())
    _feed(c, "Executing task 'evaluate-baseline'\n")
    _feed(c, "IW bound K=16:  50%|#####     | 16/32 [00:05<00:05,  3.0batch/s]\r")
    _feed(c, "IW bound K=16: 100%|##########| 32/32 [00:10<00:00,  3.0batch/s]\r")
    _feed(c, "Task 'evaluate-baseline' finished with status SUCCESS\n")
    text = term.getvalue()
    assert text.count("\r\x1b[2K    IW bound K=16:") == 2     # redrawn, not appended
    assert text.rstrip().splitlines()[-1].split("  ", 1)[1].startswith("evaluate-baseline done")


def test_a_failed_step_shows_its_last_lines_and_verbose_shows_everything():
    term = io.StringIO()
    c = StepConsole(term, io.StringIO())
    lines = ["Executing task 'prepare-data'"] + [f"line {i}" for i in range(30)] + [
        "vnca.errors.DataError: /raw: directory not found",
        "Task 'prepare-data' finished with status FAILURE"]
    _feed(c, "\n".join(lines) + "\n")
    out = term.getvalue()
    assert "prepare-data FAILURE in" in out
    assert "    | vnca.errors.DataError: /raw: directory not found" in out
    assert "line 29" in out and "line 0\n" not in out       # the tail, not the whole log
    verbose = io.StringIO()
    v = StepConsole(verbose, io.StringIO(), verbose=True)
    _feed(v, "\n".join(KFP_LINES) + "\n")
    assert "Looking for component" in verbose.getvalue()


def test_format_seconds():
    assert (format_seconds(7.4), format_seconds(59.6), format_seconds(125)) == \
        ("7s", "1m 00s", "2m 05s")


def test_a_short_bar_in_a_log_is_one_line_when_done():
    term = io.StringIO()
    c = StepConsole(term, io.StringIO())
    for n in range(5):
        _feed(c, f"encode: {25 * n:3d}%|##  | {n}/4 [00:0{n}<00:01]\r")
    assert [line.strip() for line in term.getvalue().splitlines()] == ["encode: 100% 4/4 [00:04<00:01]"]
