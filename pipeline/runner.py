"""Run a list of CLI steps the way a user would type them: print each command, run it in its folder,
pass its output through (and into a log), time it, and record it, so a rerun skips finished steps.

A step counts as finished when every output it declares exists (outputs are chosen so that they
appear only at the end of the step: a final checkpoint, one file per listed id, a JSON written last).
Its record ``<record_dir>/<step>.json`` keeps the command, wall time and the figures read from its
outputs, which is what makes the final table identical after an interrupted run is resumed.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tools.errors import WSSSError
from tools.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception so the child is cleaned up
    raise _Terminated(f"terminated by signal {signum}")


def _stop(proc: subprocess.Popen) -> None:
    """End a step's process group (started with its own session): SIGINT, then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
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


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_command(argv: Sequence[str], cwd: Path, log_path: Path, env: dict | None = None,
                echo: bool = True) -> tuple[int, str]:
    """Run ``argv`` (``python`` = this interpreter) in ``cwd``, echo its output, save it to ``log_path``.

    Returns (exit code, captured text). The child runs in its own session so that an interrupted
    pipeline (Ctrl-C, SIGTERM) stops the whole step, children included, before exiting.
    """
    real = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[bytes] = []
    old = signal.signal(signal.SIGTERM, _on_sigterm) if _is_main_thread() else None
    proc = subprocess.Popen(real, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with open(log_path, "wb") as log:
            fd = proc.stdout.fileno()
            while True:
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
        _stop(proc)
        raise
    finally:
        if proc.stdout:
            proc.stdout.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return rc, b"".join(chunks).decode("utf-8", errors="replace")


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def run_steps(steps: Sequence[Step], record_dir: Path, root: Path = REPO_ROOT, overwrite: bool = False,
              dry_run: bool = False, env: dict | None = None, echo: bool = True,
              printer: Callable[[str], None] = print) -> list[StepResult]:
    """Run (or skip) each step in order; stop at the first failure (raises :class:`StepFailed`).

    A step is skipped when all its outputs exist (and ``overwrite`` is off); its earlier record (time,
    figures) is reused when the recorded command matches, else its figures are re-read from the
    outputs. ``dry_run`` only prints the commands.
    """
    results: list[StepResult] = []
    for step in steps:
        argv = step.command(overwrite, root)
        shown = step.display(argv)
        key = step.display(step.argv)  # records are matched without the --resume/--overwrite extras
        record_path = record_dir / f"{step.name}.json"
        log_path = record_dir / f"{step.name}.log"
        record = _read_record(record_path)
        missing = step.missing_outputs(root) if step.outputs else ["(no outputs declared)"]
        if dry_run:
            printer(f"$ {shown}")
            results.append(StepResult(step.name, step.stage, shown, None, True, {}))
            continue
        if not overwrite and not missing:
            problem = step.check(root) if step.check else None
            if problem:
                raise StepFailed(f"step '{step.name}': {problem}")
            res = recorded_result(step, key, record, log_path)
            printer(f"[skip] {step.name}: outputs exist "
                    f"({'recorded' if res.seconds is not None else 'no record of this command in this experiment'})"
                    f"{'' if res.seconds is None else f', took {res.seconds:.1f} s'}")
            if record is not None and record.get("command") != key:
                printer(f"       recorded command differs; use --from {step.name} --to {step.name} --overwrite to redo it")
            results.append(res)
            continue
        printer(f"\n$ {shown}")
        partial_path = record_dir / f"{step.name}.partial.json"
        before = float((_read_record(partial_path) or {}).get("seconds", 0.0))
        t0, c0 = time.perf_counter(), _children_cpu()
        try:
            rc, text = run_command(argv, root / step.cwd, log_path, {**(env or {}), **step.env}, echo)
        except BaseException:
            # interrupted: keep the time spent so the finished step reports its whole wall time
            atomic_write_json(partial_path, {"seconds": round(before + time.perf_counter() - t0, 3)})
            raise
        seconds = time.perf_counter() - t0 + before
        cpu = _children_cpu() - c0  # CPU time of the step's processes: its cost on a quiet machine
        if rc != 0:
            atomic_write_json(partial_path, {"seconds": round(seconds, 3)})
            raise StepFailed(f"step '{step.name}' failed with exit code {rc} after {seconds:.1f} s: {shown}\n"
                             f"Its output is in {log_path}. Fix the cause and rerun: finished steps are skipped.")
        still = step.missing_outputs(root)
        if still:
            raise StepFailed(f"step '{step.name}' finished but did not write {len(still)} expected outputs, e.g. "
                             f"{', '.join(still[:3])}. Command: {shown}. Log: {log_path}")
        metrics = step.metrics(text) if step.metrics else {}
        atomic_write_json(record_path, {"step": step.name, "stage": step.stage, "command": key, "ran": shown,
                                        "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "metrics": metrics,
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
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
