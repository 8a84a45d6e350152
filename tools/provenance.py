"""Provenance records: what made a step's outputs, so that a rerun reuses them only when nothing changed.

Every step that skips finished outputs keeps a record beside them (``<out_dir>/.provenance.json`` for
a folder, ``.<name>.provenance.json`` beside a single file; the format is in docs/formats.md):

* ``inputs``: the identity of every input file (``path``/``size``/``mtime_ns`` for bulk inputs such as
  lists; ``size`` + a chunked ``sha256`` for checkpoints and weights, so a copied or re-saved file with
  the same bytes still matches), and of upstream output folders (the digest of *their* record, so a
  recomputed upstream step makes every step after it redo its work);
* ``settings``: every flag that changes the output, plus ``version``, the step's output-format version;
* ``digest``: sha256 of step + version + inputs + settings (what downstream records quote);
* ``items``: for steps with one output per image, the identity of that image's own input files
  (``[size, mtime_ns, ...]``), so an edited image or a recomputed upstream file redoes that image only;
* ``state``: ``running`` (written *before* the first output) or ``complete``.

The rule (:meth:`Provenance.plan`): an output is reused only when the record's digest equals the one
for the current inputs and settings and, for per-image outputs, its item identity is unchanged.
Anything else is redone; outputs made from other inputs are deleted before the new record is written,
so a folder never mixes outputs of two configurations, and a crash leaves a ``running`` record whose
rerun keeps the outputs it finished (each written atomically) and does the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tools.io import atomic_write_json

RECORD_NAME = ".provenance.json"
FORMAT = 1  # layout of the record file itself
_CHUNK = 1 << 20
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def record_path_for(out: os.PathLike | str, is_dir: bool = True) -> Path:
    """Where the record of ``out`` lives: ``<out>/.provenance.json`` for a folder,
    ``<parent>/.<name>.provenance.json`` for a single output file."""
    out = Path(out)
    return out / RECORD_NAME if is_dir else out.parent / f".{out.name}{RECORD_NAME}"


def sha256_file(path: os.PathLike | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; cached per process by (path, size, mtime_ns)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def file_id(path: os.PathLike | str, content: bool = False) -> dict:
    """Identity of an input file: ``{path, size, mtime_ns}``, or with ``content`` ``{path, size, sha256}``
    (the path is then shown but not compared). A missing file gives ``{path, missing: true}``."""
    p = Path(path).resolve()
    if not p.is_file():
        return {"path": str(p), "missing": True}
    st = p.stat()
    if content:
        return {"path": str(p), "size": st.st_size, "sha256": sha256_file(p)}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_id(path: os.PathLike | str) -> dict:
    """Identity of a folder read item by item (a VOC root): its resolved path; the files read from it
    are identified per item (see :func:`stat_key`)."""
    return {"path": str(Path(path).resolve())}


def ids_id(ids: Sequence[str]) -> dict:
    """Identity of an id list by content (count + sha256 of the ids in order)."""
    return {"n": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def stat_key(*paths: os.PathLike | str) -> list | None:
    """``[size, mtime_ns, ...]`` of the given files (one item's inputs); None when one is missing."""
    out: list[int] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out += [st.st_size, st.st_mtime_ns]
    return out


def read_record(path: os.PathLike | str) -> dict | None:
    """The record at ``path`` (None when absent or unreadable)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def upstream_id(out: os.PathLike | str, is_dir: bool = True, ids: Sequence[str] | None = None) -> dict:
    """Identity of an upstream step's outputs for a downstream record: the upstream record's digest and
    whether it was complete; with ``ids`` also a hash of those ids' item identities (for a step such as
    train_irn that reads a whole folder into one output). No record gives ``{path, record: null}``."""
    rec = read_record(record_path_for(out, is_dir))
    ident: dict[str, Any] = {"path": str(Path(out).resolve())}
    if rec is None:
        ident["record"] = None
        return ident
    ident["record"] = rec.get("digest")
    ident["complete"] = rec.get("state") == "complete"
    if ids is not None:
        items = rec.get("items") or {}
        ident["items"] = _hash([[i, items.get(i)] for i in ids])
    return ident


def _comparable(value: Any) -> Any:
    """Content-identified files compare without their path (a moved/copied checkpoint still matches)."""
    if isinstance(value, dict):
        if "sha256" in value and "path" in value:
            value = {k: v for k, v in value.items() if k != "path"}
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def _text_change(old: Any, new: Any) -> str:
    """``old -> new``; two long strings (a command line) are cut to the words that differ, since their
    shared start would fill the shortened text."""
    if not (isinstance(old, str) and isinstance(new, str)) or max(len(old), len(new)) <= 60:
        return f"{_short(old)} -> {_short(new)}"
    a, b = old.split(" "), new.split(" ")
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    pre, post = ("... " if i else ""), (" ..." if j else "")
    return " -> ".join(pre + _short(" ".join(w[i:len(w) - j])) + post for w in (a, b))


def _describe_input(name: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        path = new.get("path") or old.get("path")
        if "sha256" in old and "sha256" in new:
            return f"{name} changed ({path}: sha256 {old['sha256'][:8]}.. -> {new['sha256'][:8]}..)"
        if new.get("missing"):
            return f"{name} missing ({path})"
        if old.get("path") != new.get("path"):
            return f"{name} changed ({old.get('path')} -> {new.get('path')})"
        if "record" in new:
            if path is None:  # a pipeline step's record (the runner names upstream steps, not folders)
                return f"upstream step {name} " + ("has no record" if new["record"] is None else "changed")
            return f"{name} changed ({path} was recomputed)"
        if "mtime_ns" in new:
            return f"{name} changed ({path}: size/mtime differ)"
    return f"{name} changed ({_short(old)} -> {_short(new)})"


def describe_change(old: dict | None, new: dict) -> str | None:
    """One phrase naming what differs between an old record and the new one (None when they match)."""
    if old is None:
        return "no record of what made the existing outputs"
    if old.get("digest") == new["digest"]:
        return None
    parts = []
    if old.get("version") != new["version"]:
        parts.append(f"output format version changed ({old.get('version')} -> {new['version']})")
    oi, ni = old.get("inputs") or {}, new["inputs"]
    for k in sorted(set(oi) | set(ni)):
        if _comparable(oi.get(k)) != _comparable(ni.get(k)):
            parts.append(_describe_input(k, oi.get(k), ni.get(k)))
    os_, ns = old.get("settings") or {}, new["settings"]
    for k in sorted(set(os_) | set(ns)):
        if os_.get(k) != ns.get(k):
            parts.append(f"{k} changed ({_text_change(os_.get(k), ns.get(k))})")
    return ", ".join(parts) or "record differs"


@dataclass
class Plan:
    """What a run must do: ``todo`` ids to (re)compute, ``done`` ids reused, and ``change`` (None, or the
    phrase naming why earlier outputs are not reused)."""

    todo: list[str]
    done: list[str]
    change: str | None
    items: dict = field(default_factory=dict)  # id -> item identity, for the new record


class Provenance:
    """The record of one output folder (or file) for the current inputs and settings.

    ``inputs``: name → identity (:func:`file_id`, :func:`folder_id`, :func:`upstream_id`, ...);
    ``settings``: flag → JSON value; ``version``: the step's output-format version (bump it when the
    code changes what the step writes).
    """

    def __init__(self, out: os.PathLike | str, step: str, version: int, inputs: dict, settings: dict,
                 is_dir: bool = True, path: os.PathLike | str | None = None) -> None:
        self.out, self.step, self.is_dir = Path(out), step, is_dir
        # ``path``: a record kept elsewhere than beside ``out`` (the pipeline runner's per-step records)
        self.path = Path(path) if path is not None else record_path_for(out, is_dir)
        self.inputs = json.loads(json.dumps(inputs, default=str))
        self.settings = json.loads(json.dumps(settings, default=str))
        self.version = int(version)
        self.digest = _hash({"step": step, "version": self.version, "inputs": _comparable(self.inputs),
                             "settings": self.settings})
        self.old = read_record(self.path)
        self._items: dict = {}
        self._begun = False

    def record(self, state: str, items: dict | None = None, extra: dict | None = None) -> dict:
        """The record for ``state``; ``extra`` fields (figures that are not provenance, such as the
        runner's wall time) are added after the provenance fields and never replace one of them."""
        rec = {"format": FORMAT, "step": self.step, "version": self.version, "state": state,
               "digest": self.digest, "inputs": self.inputs, "settings": self.settings}
        if items is not None:
            rec["items"] = items
        for k, v in (extra or {}).items():
            rec.setdefault(k, v)
        return rec

    def change(self) -> str | None:
        """What differs from the existing record (None: it matches)."""
        return describe_change(self.old, self.record("running"))

    def matches(self) -> bool:
        return self.old is not None and self.old.get("digest") == self.digest

    @property
    def complete(self) -> bool:
        """The existing record matches and its run finished."""
        return self.matches() and self.old.get("state") == "complete"

    # --- per-item outputs -------------------------------------------------------------------------

    def plan(self, ids: Sequence[str], outputs: Callable[[str], Iterable[Path]],
             item: Callable[[str], Any] | None = None, overwrite: bool = False) -> Plan:
        """Split ``ids`` into reused and to-do (no side effects).

        An id is reused when the record matches, the id is in its ``items`` with the same item identity
        ``item(id)`` and all of ``outputs(id)`` exist; ``overwrite`` redoes every id.
        """
        cur = {i: (item(i) if item else None) for i in ids}
        if overwrite or not self.matches():
            change = "--overwrite" if overwrite else self.change()
            existing = any(p.exists() for i in ids for p in outputs(i)) or (
                self.old is not None and not overwrite)
            return Plan(list(ids), [], change if existing else None, items=cur)
        old_items = self.old.get("items") or {}

        def reusable(i: str) -> bool:
            if i not in old_items or (item is not None and (cur[i] is None or old_items[i] != cur[i])):
                return False
            return all(p.exists() for p in outputs(i))

        done = [i for i in ids if reusable(i)]
        done_set = set(done)
        todo = [i for i in ids if i not in done_set]
        return Plan(todo, done, None, items=cur)

    def start(self, ids: Sequence[str], outputs: Callable[[str], Iterable[Path]],
              item: Callable[[str], Any] | None, overwrite: bool, what: str) -> Plan:
        """:meth:`plan`, print the one line naming what changed (if anything is recomputed because of
        it), and :meth:`begin` when there is work or the record is not yet complete. Call
        :meth:`finish` after the work."""
        plan = self.plan(ids, outputs, item, overwrite)
        line = report(self.step, plan, what)
        if line:
            print(line, flush=True)
        if plan.todo or not self.complete:
            self.begin(plan, outputs)
        return plan

    def begin(self, plan: Plan, outputs: Callable[[str], Iterable[Path]]) -> None:
        """Before producing outputs: delete the to-do ids' old outputs (made from other inputs or
        unfinished), then write the ``running`` record listing every id's item identity."""
        for i in plan.todo:
            for p in outputs(i):
                if p.is_file():
                    p.unlink()
        keep = dict((self.old.get("items") or {}) if self.matches() else {})
        keep.update(plan.items)
        self._items = keep
        self._begun = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.record("running", keep), indent=None)

    def finish(self, extra: dict | None = None) -> None:
        """After the last output: mark the record ``complete`` (nothing when this run began nothing);
        ``extra`` as in :meth:`record`."""
        if self._begun:
            atomic_write_json(self.path, self.record("complete", self._items if self._items else None, extra),
                              indent=None)
            self._begun = False

    # --- a single output (trained weights) --------------------------------------------------------

    def start_single(self, extra: dict | None = None) -> None:
        """Write the ``running`` record of a single-output step (before it starts producing); ``extra``
        as in :meth:`record`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.record("running", extra=extra), indent=None)
        self._begun = True


def report(step: str, plan: Plan, what: str) -> str | None:
    """The one line a step prints when earlier outputs are not reused, e.g.
    ``make_cam: stage-one checkpoint changed (...: sha256 ab12.. -> cd34..); recomputing 1464 CAMs``."""
    if plan.change is None or not plan.todo:
        return None
    return f"{step}: {plan.change}; recomputing {len(plan.todo)} {what}"
