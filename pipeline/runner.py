"""Run a list of CLI steps the way a user would type them: print each command, run it in its folder,
pass its output through (and into a log), time it, and record it, so a rerun skips finished steps.

A step counts as finished when every output it declares exists (outputs are chosen so that they
appear only at the end of the step: a final checkpoint, one file per listed id, a JSON written last)
AND its record matches (:func:`decide`). The record ``<record_dir>/<step>.json`` is a provenance record
(tools/provenance.py, the one the stage CLIs keep beside their outputs): inputs = the digests of its
upstream steps' records, settings = the command as typed, state ``running`` (written before the command
starts) or ``complete`` (after its outputs were verified). Its digest follows from those alone, so a
changed command changes it, and with it the inputs of every step reading that one: that step and those
after it are redone, nothing before it; a step rerun with the same command and upstream (its outputs
were deleted, an interrupted attempt finished) keeps its digest and its readers are kept. Beside the
provenance fields the record keeps wall time and the figures read from the outputs, which is what makes
the final table identical after an interrupted run is resumed. Records of older runners (``command`` +
``upstream`` with time-based digests, ``<step>.start.json``) are read as what this runner would have
written for them (:func:`read_step_record`).
"""
from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tools.errors import EXIT_INTERRUPTED, INTERRUPTED_MESSAGE, WSSSError
from tools.io import atomic_write_json, proc_stat_fields
from tools.provenance import Provenance, describe_change, read_record

REPO_ROOT = Path(__file__).resolve().parents[1]
# how often a running step's elapsed time is saved: a runner killed outright (SIGKILL) loses at most this
HEARTBEAT_S = 10.0
# version of the runner's step record (part of its digest: bump it when what a record stands for changes)
RECORD_VERSION = 1


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


def _group_alive(pgid: int) -> bool:
    """True while the process group ``pgid`` has a member that is not a zombie (a dead process waiting to
    be reaped). Without ``/proc`` any member counts."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True
    for entry in os.scandir("/proc"):
        fields = proc_stat_fields(entry.name) if entry.name.isdigit() else None  # None: it ended meanwhile
        if fields and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop(proc: subprocess.Popen) -> None:
    """End a step's process group (started with its own session): SIGINT, then SIGTERM, then SIGKILL,
    each given its grace period, until the step *and every other member of its group* are gone (a child
    of the step that outlived it would otherwise run on with no one to stop it).

    Further SIGINT/SIGTERM/SIGHUP are ignored meanwhile: a second Ctrl-C must not abort the stopping
    and leave the step running.
    """
    held = {}
    if _is_main_thread():
        for s in (signal.SIGINT,) + _STOP_SIGNALS:
            held[s] = signal.signal(s, signal.SIG_IGN)

    def over() -> bool:
        return proc.poll() is not None and not _group_alive(proc.pid)

    try:
        for sig, wait in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), STOP_GRACE_S):
            if over():
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            end = time.monotonic() + wait
            while time.monotonic() < end and not over():
                try:
                    proc.wait(min(0.05, max(0.0, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
        proc.wait()  # after SIGKILL to the group: reap the step
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
        prev = read_record(path) or {}
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
    # the step's record for the current command and upstream (its digest is the one the step has after
    # running); every decision of :func:`decide` has it
    prov: Provenance | None = field(default=None, repr=False)


def upstream_of(steps: Sequence[Step], i: int) -> list[str]:
    """Names of the steps ``steps[i]`` reads from: its ``needs``, else the step before it."""
    if steps[i].needs is not None:
        return list(steps[i].needs)
    return [steps[i - 1].name] if i > 0 else []


def _record_path(record_dir: Path, name: str) -> Path:
    return record_dir / f"{name}.json"


def _provenance(name: str, command: str, upstream: dict, record_dir: Path) -> Provenance:
    """The record of step ``name`` run as ``command`` (as typed) after upstream records ``upstream``
    (``{step: digest or None}``); its ``old`` is the existing record, read by :func:`read_step_record`."""
    return Provenance(record_dir, name, RECORD_VERSION, {n: {"record": d} for n, d in upstream.items()},
                      {"command": command}, path=_record_path(record_dir, name))


def read_step_record(record_dir: Path, name: str) -> dict | None:
    """The record of step ``name`` in ``record_dir`` (None when there is none or it is unreadable).

    A record of an older runner (``{command, upstream: {step: time-based digest}, ...}`` in
    ``<step>.json``, or ``<step>.start.json`` of an interrupted attempt) is read as the record this runner
    would have written for it: an upstream digest that is still the one in that upstream step's record
    becomes that step's (converted) digest, any other one a value no current record has. A finished
    experiment of an older runner is thus skipped as it was, and a changed one redoes what it did.
    """
    return _read_step_record(record_dir, name, frozenset())


def _read_step_record(record_dir: Path, name: str, seen: frozenset) -> dict | None:
    path = _record_path(record_dir, name)
    rec, state = read_record(path), "complete"
    if rec is not None and "format" in rec:
        return rec
    if rec is None:
        rec, state = read_record(record_dir / f"{name}.start.json"), "running"
    if rec is None or not isinstance(rec.get("command"), str) or not isinstance(rec.get("upstream"), dict) \
            or name in seen:
        return None
    upstream = {}
    for n, d in rec["upstream"].items():
        up = None
        if d is not None and (read_record(_record_path(record_dir, n)) or {}).get("digest") == d:
            up = _read_step_record(record_dir, n, seen | {name})
        upstream[n] = (reader_identity(up) if up is not None and up.get("state") == "complete"
                       else None if d is None else f"older runner: {d}")
    extra = {k: v for k, v in rec.items() if k not in ("command", "upstream", "digest")}
    return _provenance(name, rec["command"], upstream, record_dir).record(state, extra=extra)


def reader_identity(rec: dict) -> str:
    """What the steps reading a finished step record of it: its digest AND which run made it (a random
    ``run_id``; records of older runners: their finishing time). The digest
    alone (command + upstream) would let a step that ran again with the same command (its outputs
    deleted, a training rerun that is not bit-exact on a GPU) keep readers made from its old outputs,
    and the runner, skipping them, would never start the tools whose own records would notice."""
    return f"{rec.get('digest')} run {rec.get('run_id') or rec.get('finished')}"


def upstream_digests(names: Sequence[str], record_dir: Path, planned: dict | None = None) -> dict:
    """``{name: reader_identity of its complete record}`` (None when it has none, or only a ``running``
    one); ``planned`` gives the values of steps that will run before this one in the same run."""
    out = {}
    for n in names:
        if planned and n in planned:
            out[n] = planned[n]
        else:
            rec = read_step_record(record_dir, n) or {}
            out[n] = reader_identity(rec) if rec.get("state") == "complete" else None
    return out


def decide(step: Step, record_dir: Path, root: Path, upstream: dict, overwrite: bool = False) -> Decision:
    """The runner's rule: a step is done only when its outputs exist AND its complete record (the
    command as typed + the digests of its upstream steps' records) matches. A differing record (or an
    interrupted attempt made with another command/upstream) means a redo; a matching interrupted
    attempt or missing outputs mean a plain run (which may resume); no record with every output present
    means a redo. ``upstream``: ``{step: digest}`` (see :func:`upstream_digests`)."""
    prov = _provenance(step.name, step.display(step.argv), upstream, record_dir)
    prov.old = read_step_record(record_dir, step.name)
    if overwrite:
        return Decision(True, True, "--overwrite", prov)
    missing = step.missing_outputs(root) if step.outputs else ["(no outputs declared)"]
    if prov.old is None:
        if not missing:
            return Decision(True, True, describe_change(None, prov.record("running")), prov)
        return Decision(True, False, "not run yet", prov)
    change = prov.change()
    if prov.old.get("state") != "complete":
        if change:
            return Decision(True, True, f"an interrupted attempt was made differently: {change}", prov)
        return Decision(True, False, "finishing an interrupted attempt", prov)
    if change:
        return Decision(True, True, change, prov)
    if missing:
        return Decision(True, False, f"{len(missing)} output(s) missing, e.g. {missing[0]}", prov)
    return Decision(False, False, "outputs exist and the record matches", prov)


def planned_decisions(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT,
                      overwrite: bool = False) -> list[Decision]:
    """What :func:`run_steps` will do with each of ``steps``, decided before any of them runs: the
    :func:`decide` rule, where a step that will run counts as changed for every step that reads it."""
    planned: dict[str, str] = {}
    out = []
    for idx, step in enumerate(steps):
        d = decide(step, record_dir, root, upstream_digests(upstream_of(steps, idx), record_dir, planned), overwrite)
        if d.run:  # a step that runs gets a new finishing time: its readers run after it
            planned[step.name] = f"{d.prov.digest} runs in this session"
        out.append(d)
    return out


def run_steps(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT, overwrite: bool = False,
              dry_run: bool = False, env: dict | None = None, echo: bool = True,
              printer: Callable[[str], None] = print) -> list[StepResult]:
    """Run (or skip) each step in order; stop at the first failure (raises :class:`StepFailed`).

    A step is skipped only when :func:`decide` says so (outputs exist and its record, the command plus
    the digests of its upstream steps' records, matches); its earlier record (time, figures) is then
    reused. A step redone because its record differs runs with its ``overwrite_args`` (never resumed),
    and every step after it that reads it is redone too (its digest changed). ``dry_run`` only prints
    what would run.
    """
    results: list[StepResult] = []
    planned = planned_decisions(steps, record_dir, root, overwrite) if dry_run else []
    for idx, step in enumerate(steps):
        key = step.display(step.argv)  # records are matched without the --resume/--overwrite extras
        log_path = record_dir / f"{step.name}.log"
        decision = planned[idx] if dry_run else decide(
            step, record_dir, root, upstream_digests(upstream_of(steps, idx), record_dir), overwrite)
        prov = decision.prov
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
            res = recorded_result(step, key, prov.old, log_path)
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
        # also before the command starts, replacing the old record (which no longer describes the
        # outputs): the running record says what this attempt runs, so that a rerun after an
        # interruption knows whether it may resume it
        prov.start_single(extra={"stage": step.stage, "ran": shown, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        (record_dir / f"{step.name}.start.json").unlink(missing_ok=True)  # an older runner's running record
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
        prov.finish(extra={"stage": step.stage, "ran": shown, "seconds": round(seconds, 3),
                           "cpu_seconds": round(cpu, 3), "metrics": metrics,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": uuid.uuid4().hex})
        if partial_path.exists():
            partial_path.unlink()
        printer(f"[done] {step.name} in {seconds:.1f} s (CPU {cpu:.1f} s)"
                + (f" (incl. {before:.1f} s of earlier attempts)" if before else ""))
        results.append(StepResult(step.name, step.stage, shown, seconds, False, metrics, str(log_path), cpu))
    return results


def recorded_result(step: Step, shown: str, record: dict | None, log_path: Path) -> StepResult:
    """The result of a finished step without running it: time from its record (as
    :func:`read_step_record` gives it) when that is complete and its command is the current one (else
    unknown); figures re-read from its outputs (the reader may know more fields than when the step ran),
    those of the record where the outputs give none."""
    same = (record is not None and record.get("state") == "complete"
            and (record.get("settings") or {}).get("command") == shown)
    metrics = {}
    if step.metrics:
        metrics = step.metrics(log_path.read_text(errors="replace") if log_path.is_file() else "")
    if not metrics and same:
        metrics = dict(record.get("metrics") or {})
    return StepResult(step.name, step.stage, shown, record.get("seconds") if same else None, True, metrics,
                      str(log_path) if log_path.is_file() else None, record.get("cpu_seconds") if same else None)


def collect_results(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT) -> list[StepResult]:
    """Results of every step whose outputs exist (others: empty figures), running nothing."""
    out = []
    for step in steps:
        shown = step.display(step.argv)
        if step.outputs and not step.missing_outputs(root):
            out.append(recorded_result(step, shown, read_step_record(record_dir, step.name),
                                       record_dir / f"{step.name}.log"))
        else:
            out.append(StepResult(step.name, step.stage, shown, None, False, {}))
    return out


def check_requirements(steps: Sequence[Step], root: Path = REPO_ROOT, overwrite: bool = False, *,
                       record_dir: Path) -> None:
    """Raise ONE :class:`tools.errors.MissingFileError` naming every missing external input of
    ``steps`` (each with where to get it) before any of them runs.

    Only the steps that :func:`run_steps` will run with the records in ``record_dir`` (the same
    :func:`decide` rule, see :func:`planned_decisions`) are checked: a skipped step needs nothing, a
    step redone because its record changed does. An input inside an output of an earlier step of
    ``steps`` is not checked, since that step makes it. A step that will run and reads a step left out
    of ``steps`` (``--from``) which never finished is named in the same error.
    """
    from tools.errors import missing_inputs, raise_missing

    made: list[str] = []
    needs: list[tuple] = []
    unmade: list[str] = []  # steps that will run but read a step outside the selection that never finished
    selected = {s.name for s in steps}
    for idx, (step, decision) in enumerate(zip(steps, planned_decisions(steps, record_dir, root, overwrite))):
        if decision.run:
            for up in upstream_of(steps, idx):
                rec = read_step_record(record_dir, up) if up not in selected else None
                if up not in selected and (rec is None or rec.get("state") != "complete"):
                    unmade.append(f"step '{step.name}' reads the outputs of step '{up}', which has not finished "
                                  f"(no complete record in {record_dir}); run from an earlier stage "
                                  f"(--from {up}) or without --from.")
            for req in step.requires:
                kind = req[3] if len(req) > 3 else "file"
                alts = list(req[0]) if isinstance(req[0], (list, tuple)) else [req[0]]
                if kind == "module":
                    needs.append(req)
                elif not any(str(a) == m or str(a).startswith(m.rstrip("/") + "/") for a in alts for m in made):
                    needs.append(([root / a for a in alts], *req[1:]))
        made += [o.folder if isinstance(o, PerIdOutputs) else str(o) for o in step.outputs]
    raise_missing(unmade + missing_inputs(needs), context=f"before the first step ({steps[0].name}) ran" if steps else "")
