"""Run a list of CLI steps the way a user would type them: print each command, run it in its folder,
pass its output through (and into a log), time it, and record it, so a rerun skips finished steps.

A step counts as finished when every output it declares exists (outputs are chosen so that they
appear only at the end of the step: a final checkpoint, one file per listed id, a JSON written last)
AND its record matches (:func:`decide`). Its record ``<record_dir>/<step>.json`` keeps the command, the
digests of its upstream steps' records, its own digest, wall time and the figures read from its
outputs, which is what makes the final table identical after an interrupted run is resumed; a changed
command redoes that step and every step after it that reads it, nothing before it.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tools.errors import EXIT_INTERRUPTED, INTERRUPTED_MESSAGE, WSSSError
from tools.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
# how often a running step's elapsed time is saved: a runner killed outright (SIGKILL) loses at most this
HEARTBEAT_S = 10.0


class StepFailed(WSSSError):
    """A step's command exited with a non-zero status."""


@dataclass
class PerIdOutputs:
    """"One ``<folder>/<id><suffix>`` per id of ``list_file``" (paths relative to the repo root)."""

    folder: str
    list_file: str
    suffix: str

    def missing(self, root: Path) -> list[str]:
        from voc12.data import read_id_list

        lst = root / self.list_file
        if not lst.is_file():
            return [self.list_file]
        folder = root / self.folder
        return [f"{self.folder}/{i}{self.suffix}" for i in read_id_list(lst)
                if not (folder / f"{i}{self.suffix}").is_file()]


@dataclass
class Step:
    """One command of the pipeline.

    ``argv`` is what the user types (starting with ``python``), run in ``cwd`` (relative to the
    repo root). ``outputs`` (repo-relative paths or :class:`PerIdOutputs`) must all exist for the
    step to count as done. ``metrics(log_text) -> dict`` reads the step's figures (from its JSON
    outputs or its printed lines). ``overwrite_args`` are appended under ``--overwrite``.
    """

    name: str
    stage: str
    argv: list[str]
    cwd: str = "."
    outputs: list = field(default_factory=list)
    metrics: Callable[[str], dict] | None = None
    overwrite_args: list[str] = field(default_factory=list)
    resume_args: list[str] = field(default_factory=list)  # added when ``resume_if`` matches a file
    resume_if: str | None = None  # repo-relative path or glob pattern
    title: str = ""
    env: dict = field(default_factory=dict)  # extra environment, shown in front of the command
    # ``check(root) -> message or None``: existing outputs made with other settings (an error, not a skip)
    check: Callable[[Path], str | None] | None = None
    # external inputs checked before the first step runs (see check_requirements): tuples
    # ``(repo-relative path or list of alternatives, what, where to get it[, "file" | "dir" | "module"])``
    requires: list = field(default_factory=list)
    # names of the steps whose outputs this one reads (None: the step before it in the list); their
    # records' digests are part of this step's record, so redoing one of them redoes this step
    needs: list[str] | None = None

    def command(self, overwrite: bool = False, root: Path = REPO_ROOT) -> list[str]:
        argv = list(self.argv)
        if overwrite:
            argv += self.overwrite_args
        elif self.resume_if and any(root.glob(self.resume_if)):
            argv += self.resume_args
        return argv

    def display(self, argv: Sequence[str]) -> str:
        cmd = shlex.join(argv)
        if self.env:
            cmd = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in self.env.items()) + " " + cmd
        return cmd if self.cwd in ("", ".") else f"cd {self.cwd} && {cmd}"

    def missing_outputs(self, root: Path = REPO_ROOT) -> list[str]:
        out: list[str] = []
        for o in self.outputs:
            if isinstance(o, PerIdOutputs):
                out += o.missing(root)
            elif not (root / o).exists():
                out.append(str(o))
        return out


@dataclass
class StepResult:
    name: str
    stage: str
    command: str
    seconds: float | None
    skipped: bool
    metrics: dict
    log: str | None = None
    cpu_seconds: float | None = None


class _Terminated(KeyboardInterrupt):  # handled like Ctrl-C by callers
    pass


class StepInterrupted(KeyboardInterrupt):
    """The pipeline stopped while ``step`` ran (Ctrl-C, SIGTERM/SIGHUP to the runner, or the step itself
    exiting as interrupted); ``step_said`` is True when the step's own ``interrupted: ...`` line
    (tools.errors.INTERRUPTED_MESSAGE) was already echoed, so the caller need not print another."""

    def __init__(self, step: str, step_said: bool = False) -> None:
        super().__init__(step)
        self.step, self.step_said = step, step_said


def _on_sigterm(signum, frame):  # turn SIGTERM/SIGHUP into an exception so the child is cleaned up
    raise _Terminated(f"terminated by signal {signum}")


# signals that end the runner; each stops the running step's whole process group first
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
# grace periods after SIGINT, SIGTERM and SIGKILL to the step's process group
STOP_GRACE_S = (10.0, 5.0, 5.0)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _stop(proc: subprocess.Popen) -> None:
    """End a step's process group (started with its own session): SIGINT, then SIGTERM, then SIGKILL.

    Further SIGINT/SIGTERM/SIGHUP are ignored meanwhile: a second Ctrl-C must not abort the stopping
    and leave the step running.
    """
    held = {}
    if _is_main_thread():
        for s in (signal.SIGINT,) + _STOP_SIGNALS:
            held[s] = signal.signal(s, signal.SIG_IGN)
    try:
        for sig, wait in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), STOP_GRACE_S):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
    finally:
        for s, h in held.items():
            signal.signal(s, h)


def _die_with_runner() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send SIGTERM to the step when the runner dies, also by
    SIGKILL, when no handler of ours can run (Linux ``PR_SET_PDEATHSIG``; None elsewhere).

    Only the step's own process gets the signal (its children are up to it), and it fires when the
    thread that started the step ends, so steps are started from the thread that waits for them.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    runner = os.getpid()

    def setup() -> None:  # runs in the forked child before exec: no imports, no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != runner:  # the runner died between fork and prctl: nobody will signal us
            os._exit(143)

    return setup


# A small process next to each step: it blocks on a pipe from the runner. The runner writes one byte
# when the step is over; end-of-file without it means the runner died outright, and the watcher then
# ends the step's whole process group (SIGTERM, SIGKILL 5 s later). PR_SET_PDEATHSIG reaches only the
# step itself, not the workers it started (evaluation pools, data loaders).
_GROUP_WATCHER = """
import os, signal, sys, time
group = int(sys.argv[1])
if sys.stdin.buffer.read(1):
    sys.exit(0)
for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(group, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            time.sleep(0.05)
            os.killpg(group, 0)
    except ProcessLookupError:
        break
"""


def _start_watcher(group: int) -> subprocess.Popen | None:
    """Start the group watcher of a step whose process group is ``group`` (None if it cannot start).
    It has its own session, so a Ctrl-C or hang-up of the terminal does not reach it."""
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", _GROUP_WATCHER, str(group)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        return None


def _release_watcher(watcher: subprocess.Popen | None) -> None:
    """Tell the watcher the step is over (it exits without signalling anything) and reap it."""
    if watcher is None:
        return
    try:
        watcher.stdin.write(b"x")
        watcher.stdin.close()
    except OSError:
        pass
    try:
        watcher.wait(5)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_command(argv: Sequence[str], cwd: Path, log_path: Path, env: dict | None = None,
                echo: bool = True, heartbeat: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run ``argv`` (``python`` = this interpreter) in ``cwd``, echo its output, save it to ``log_path``.

    Returns (exit code, captured text). The child runs in its own session so that an interrupted
    pipeline (Ctrl-C, SIGTERM, SIGHUP) stops the whole step, children included, before exiting; a
    Ctrl-C on the terminal thus reaches the step once, forwarded by :func:`_stop`. On Linux the step
    also gets SIGTERM when the runner is killed outright (SIGKILL). ``heartbeat()`` is called about
    every ``HEARTBEAT_S`` seconds while the step runs.
    """
    real = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[bytes] = []
    old = {s: signal.signal(s, _on_sigterm) for s in _STOP_SIGNALS} if _is_main_thread() else {}
    proc = watcher = None
    try:
        proc = subprocess.Popen(real, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_runner())
        watcher = _start_watcher(proc.pid)
        with open(log_path, "wb") as log:
            fd = proc.stdout.fileno()
            next_beat = time.monotonic() + HEARTBEAT_S
            while True:
                if heartbeat is not None:
                    if time.monotonic() >= next_beat:
                        heartbeat()
                        next_beat = time.monotonic() + HEARTBEAT_S
                    ready, _, _ = select.select([fd], [], [], max(0.0, next_beat - time.monotonic()))
                    if not ready:
                        continue
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
                log.write(data)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(data)
                    sys.stdout.flush()
        rc = proc.wait()
    except BaseException:
        if proc is not None:
            _stop(proc)
        raise
    finally:
        if proc is not None and proc.stdout:
            proc.stdout.close()
        _release_watcher(watcher)
        for s, h in old.items():
            signal.signal(s, h)
    return rc, b"".join(chunks).decode("utf-8", errors="replace")


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _AttemptClock:
    """Wall time of one step over all its attempts, kept in ``<step>.partial.json`` until it finishes.

    The file is written when an attempt starts and at every heartbeat, so a runner killed outright
    (SIGKILL) loses at most one heartbeat interval of the attempt; the next attempt adds the rest.
    Fields: ``seconds`` (all attempts so far, the only field older runners wrote and read),
    ``attempts``, ``started``/``updated`` (local time of this attempt's start and last save) and
    ``running`` (true while an attempt runs: still true afterwards means it was killed outright).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        prev = _read_record(path) or {}
        self.before = float(prev.get("seconds", 0.0))
        self.attempts = int(prev.get("attempts", 1 if self.before else 0)) + 1
        self.killed = prev.get("updated") if prev.get("running") else None  # last heartbeat of a killed attempt
        self.t0 = time.perf_counter()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    def save(self, running: bool) -> None:
        atomic_write_json(self.path, {"seconds": round(self.before + time.perf_counter() - self.t0, 3),
                                      "attempts": self.attempts, "started": self.started,
                                      "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "running": running})

    def beat(self) -> None:
        try:
            self.save(running=True)
        except OSError:  # a full disk must not stop a long step over its bookkeeping
            pass


def _dirs_under(top: Path) -> set[Path]:
    """``top`` and every folder below it (symbolic links are not followed)."""
    out, todo = {top}, [top]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        out.add(Path(e.path))
                        todo.append(Path(e.path))
        except OSError:
            continue
    return out


class _NewFolders:
    """The folders a step creates, so that those still empty after it failed can be removed.

    Watched: the experiment folder (the record folder's parent) and each declared output's folder.
    An existing one is listed before the step; for one that does not exist yet, its topmost missing
    ancestor is new as a whole. The repository root itself is never listed (it holds the data).
    """

    def __init__(self, step: Step, root: Path, record_dir: Path) -> None:
        root = Path(os.path.abspath(root))
        tops = {Path(os.path.abspath(record_dir)).parent}
        for o in step.outputs:
            tops.add(Path(os.path.abspath(root / (o.folder if isinstance(o, PerIdOutputs) else Path(str(o)).parent))))
        self.before: dict[Path, set[Path]] = {}
        self.fresh: set[Path] = set()
        for t in tops:
            first_missing = None
            while not t.exists() and t != t.parent:
                first_missing, t = t, t.parent
            if first_missing is not None:
                self.fresh.add(first_missing)
            elif t != root and t not in root.parents:
                self.before[t] = _dirs_under(t)

    def remove_empty(self, printer: Callable[[str], None] = print) -> list[Path]:
        """Remove the new folders that are empty (deepest first); returns them."""
        cands: set[Path] = set()
        for top, old in self.before.items():
            if top.is_dir():
                cands |= _dirs_under(top) - old
        for top in self.fresh:
            if top.is_dir():
                cands |= _dirs_under(top)
        removed = []
        for d in sorted(cands, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()  # fails on a folder with anything in it, which is kept
                removed.append(d)
            except OSError:
                continue
        if removed:
            printer(f"removed {len(removed)} empty folder(s) the failed step had created: "
                    + ", ".join(str(p) for p in sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
        return removed


@dataclass
class Decision:
    """Whether a step runs, and whether with its ``overwrite_args`` (``redo``: its outputs, or an
    interrupted attempt, were made by another command or from other upstream outputs, so nothing of
    them may be reused or resumed). ``reason`` says why, in a few words."""

    run: bool
    redo: bool
    reason: str


def upstream_of(steps: Sequence[Step], i: int) -> list[str]:
    """Names of the steps ``steps[i]`` reads from: its ``needs``, else the step before it."""
    if steps[i].needs is not None:
        return list(steps[i].needs)
    return [steps[i - 1].name] if i > 0 else []


def upstream_digests(names: Sequence[str], record_dir: Path, to_run: set[str] = frozenset()) -> dict:
    """``{name: digest of its finished record}`` (None when it has none; a marker for a step that
    will run before this one in the same dry run)."""
    out = {}
    for n in names:
        rec = _read_record(record_dir / f"{n}.json") or {}
        out[n] = "(redone in this run)" if n in to_run else rec.get("digest")
    return out


def _differs(rec: dict, command: str, upstream: dict) -> str | None:
    if rec.get("command") != command:
        return f"the command changed (recorded: {rec.get('command')})"
    old = rec.get("upstream") or {}
    changed = [n for n in sorted(set(old) | set(upstream)) if old.get(n) != upstream.get(n)]
    return f"upstream step{'s' if len(changed) > 1 else ''} {', '.join(changed)} redone since" if changed else None


def decide(step: Step, record_dir: Path, root: Path, upstream: dict, overwrite: bool = False) -> Decision:
    """The runner's rule: a step is done only when its outputs exist AND its record (the command as
    typed + the digests of its upstream steps' records) matches. A differing record (or an interrupted
    attempt made with another command/upstream) means a redo; a matching interrupted attempt or missing
    outputs mean a plain run (which may resume); no record with every output present means a redo."""
    if overwrite:
        return Decision(True, True, "--overwrite")
    key = step.display(step.argv)
    missing = step.missing_outputs(root) if step.outputs else ["(no outputs declared)"]
    rec = _read_record(record_dir / f"{step.name}.json")
    if rec is not None and "upstream" in rec:
        diff = _differs(rec, key, upstream)
        if diff:
            return Decision(True, True, diff)
        if missing:
            return Decision(True, False, f"{len(missing)} output(s) missing, e.g. {missing[0]}")
        return Decision(False, False, "outputs exist and the record matches")
    start = _read_record(record_dir / f"{step.name}.start.json")
    if start is not None:
        diff = _differs(start, key, upstream)
        if diff:
            return Decision(True, True, f"an interrupted attempt was made differently: {diff}")
        return Decision(True, False, "finishing an interrupted attempt")
    if not missing:
        return Decision(True, True, "no record of what made the existing outputs")
    return Decision(True, False, "not run yet")


def planned_decisions(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT,
                      overwrite: bool = False) -> list[Decision]:
    """What :func:`run_steps` will do with each of ``steps``, decided before any of them runs: the
    :func:`decide` rule, where a step that will run counts as redone for every step that reads it."""
    will_run: set[str] = set()
    out = []
    for idx, step in enumerate(steps):
        upstream = upstream_digests(upstream_of(steps, idx), record_dir, will_run)
        d = decide(step, record_dir, root, upstream, overwrite)
        if d.run:
            will_run.add(step.name)
        out.append(d)
    return out


def run_steps(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT, overwrite: bool = False,
              dry_run: bool = False, env: dict | None = None, echo: bool = True,
              printer: Callable[[str], None] = print) -> list[StepResult]:
    """Run (or skip) each step in order; stop at the first failure (raises :class:`StepFailed`).

    A step is skipped only when :func:`decide` says so (outputs exist and its record, the command plus
    the digests of its upstream steps' records, matches); its earlier record (time, figures) is then
    reused. A step redone because its record differs runs with its ``overwrite_args`` (never resumed),
    and every step after it that reads it is redone too. ``dry_run`` only prints what would run.
    """
    results: list[StepResult] = []
    planned = planned_decisions(steps, record_dir, root, overwrite) if dry_run else []
    for idx, step in enumerate(steps):
        key = step.display(step.argv)  # records are matched without the --resume/--overwrite extras
        record_path = record_dir / f"{step.name}.json"
        log_path = record_dir / f"{step.name}.log"
        record = _read_record(record_path)
        upstream = upstream_digests(upstream_of(steps, idx), record_dir)
        decision = planned[idx] if dry_run else decide(step, record_dir, root, upstream, overwrite)
        argv = step.command(decision.redo, root)
        shown = step.display(argv)
        if dry_run:
            if decision.run:
                printer(f"# {step.name}: {decision.reason}\n$ {shown}")
            else:
                printer(f"[skip] {step.name}: {decision.reason}")
            results.append(StepResult(step.name, step.stage, shown, None, True, {}))
            continue
        if step.check and not overwrite and not step.missing_outputs(root):
            problem = step.check(root)  # outputs there but made with other settings: an error, not a redo
            if problem:
                raise StepFailed(f"step '{step.name}': {problem}")
        if not decision.run:
            res = recorded_result(step, key, record, log_path)
            printer(f"[skip] {step.name}: {decision.reason}"
                    f"{'' if res.seconds is None else f', took {res.seconds:.1f} s'}")
            results.append(res)
            continue
        if decision.redo and decision.reason != "--overwrite":
            printer(f"\n[redo] {step.name}: {decision.reason}")
        printer(f"\n$ {shown}")
        partial_path = record_dir / f"{step.name}.partial.json"
        clock = _AttemptClock(partial_path)
        before = clock.before
        if clock.killed:
            printer(f"       (an earlier attempt was killed without saving its time; it counts until its "
                    f"last heartbeat at {clock.killed})")
        new_dirs = _NewFolders(step, root, record_dir)
        record_dir.mkdir(parents=True, exist_ok=True)
        clock.save(running=True)  # before the child starts: a runner killed outright still leaves its start
        start_path = record_dir / f"{step.name}.start.json"
        # also before the command starts: what this attempt runs, so that a rerun after an interruption
        # knows whether it may resume it; the old record no longer describes the outputs
        atomic_write_json(start_path, {"command": key, "upstream": upstream,
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        record_path.unlink(missing_ok=True)
        t0, c0 = clock.t0, _children_cpu()
        try:
            rc, text = run_command(argv, root / step.cwd, log_path, {**(env or {}), **step.env}, echo,
                                   heartbeat=clock.beat)
        except BaseException as e:
            # interrupted: keep the time spent so the finished step reports its whole wall time
            clock.save(running=False)
            new_dirs.remove_empty(printer)
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, StepInterrupted):
                raise StepInterrupted(step.name) from e
            raise
        seconds = time.perf_counter() - t0 + before
        cpu = _children_cpu() - c0  # CPU time of the step's processes: its cost on a quiet machine
        if rc != 0:
            clock.save(running=False)
            new_dirs.remove_empty(printer)
            if rc in (EXIT_INTERRUPTED, -signal.SIGINT):  # the step was interrupted, not broken
                raise StepInterrupted(step.name, echo and INTERRUPTED_MESSAGE in text)
            raise StepFailed(f"step '{step.name}' failed with exit code {rc} after {seconds:.1f} s: {shown}\n"
                             f"Its output is in {log_path}. Fix the cause and rerun: finished steps are skipped.")
        still = step.missing_outputs(root)
        if still:
            raise StepFailed(f"step '{step.name}' finished but did not write {len(still)} expected outputs, e.g. "
                             f"{', '.join(still[:3])}. Command: {shown}. Log: {log_path}")
        metrics = step.metrics(text) if step.metrics else {}
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        digest = hashlib.sha256(json.dumps([key, upstream, finished, seconds, os.getpid()], sort_keys=True,
                                           default=str).encode()).hexdigest()
        atomic_write_json(record_path, {"step": step.name, "stage": step.stage, "command": key, "ran": shown,
                                        "upstream": upstream, "digest": digest,
                                        "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "metrics": metrics,
                                        "finished": finished})
        start_path.unlink(missing_ok=True)
        if partial_path.exists():
            partial_path.unlink()
        printer(f"[done] {step.name} in {seconds:.1f} s (CPU {cpu:.1f} s)"
                + (f" (incl. {before:.1f} s of earlier attempts)" if before else ""))
        results.append(StepResult(step.name, step.stage, shown, seconds, False, metrics, str(log_path), cpu))
    return results


def recorded_result(step: Step, shown: str, record: dict | None, log_path: Path) -> StepResult:
    """The result of a finished step without running it: time and figures from its record when the
    recorded command is the current one, else figures re-read from its outputs (time unknown)."""
    same = record is not None and record.get("command") == shown
    if same:
        metrics = dict(record.get("metrics") or {})
    else:
        log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        metrics = step.metrics(log_text) if step.metrics else {}
    return StepResult(step.name, step.stage, shown, record.get("seconds") if same else None, True, metrics,
                      str(log_path) if log_path.is_file() else None, record.get("cpu_seconds") if same else None)


def collect_results(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT) -> list[StepResult]:
    """Results of every step whose outputs exist (others: empty figures), running nothing."""
    out = []
    for step in steps:
        shown = step.display(step.argv)
        if step.outputs and not step.missing_outputs(root):
            out.append(recorded_result(step, shown, _read_record(record_dir / f"{step.name}.json"),
                                       record_dir / f"{step.name}.log"))
        else:
            out.append(StepResult(step.name, step.stage, shown, None, False, {}))
    return out


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_requirements(steps: Sequence[Step], root: Path = REPO_ROOT, overwrite: bool = False, *,
                       record_dir: Path) -> None:
    """Raise ONE :class:`tools.errors.MissingFileError` naming every missing external input of
    ``steps`` (each with where to get it) before any of them runs.

    Only the steps that :func:`run_steps` will run with the records in ``record_dir`` (the same
    :func:`decide` rule, see :func:`planned_decisions`) are checked: a skipped step needs nothing, a
    step redone because its record changed does. An input inside an output of an earlier step of
    ``steps`` is not checked, since that step makes it.
    """
    from tools.errors import require_all

    made: list[str] = []
    needs: list[tuple] = []
    for step, decision in zip(steps, planned_decisions(steps, record_dir, root, overwrite)):
        if decision.run:
            for req in step.requires:
                kind = req[3] if len(req) > 3 else "file"
                alts = list(req[0]) if isinstance(req[0], (list, tuple)) else [req[0]]
                if kind == "module":
                    needs.append(req)
                elif not any(str(a) == m or str(a).startswith(m.rstrip("/") + "/") for a in alts for m in made):
                    needs.append(([root / a for a in alts], *req[1:]))
        made += [o.folder if isinstance(o, PerIdOutputs) else str(o) for o in step.outputs]
    require_all(needs, context=f"before the first step ({steps[0].name}) ran" if steps else "")
