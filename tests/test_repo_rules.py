"""Rules about the repository itself, checked by reading its files.

* Self-contained: no code, config or document cites material a user of this repository does not have
  (the maintainers' prose specs, their section numbers, a numbered list of commands that README.md does
  not define, or a folder beside the clone). Say the fact, or point to a docs/ file of this repository.
* Layering: no library module and no CLI imports a CLI; no test or bench imports a CLI module. Tests run a
  CLI through ``conftest.cli_main`` / ``conftest.cli_module`` (or as a process) and take everything else
  from the library.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from conftest import CLI_SCRIPTS, ROOT

# ----------------------------------------------------------------------------------------------
# Self-contained repository: no citations of documents outside it
# ----------------------------------------------------------------------------------------------

TEXT_SUFFIXES = {".py", ".json", ".toml", ".txt", ".md", ".yaml", ".yml", ".cfg", ".ini", ".sh"}
# generated or user data (ignored by git), and the parity fixtures, which describe how they were made
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv", "venv", "data", "pretrained",
             "runs"}
SKIP_PATHS = {"tests/fixtures", "irn/result", "irn/sess", "experiments"}
KEEP_FILES = {"experiments/README.md"}

# Each pattern is written so that this file's own source does not match it.
FOREIGN_CITATIONS = [
    (re.compile(r"stage[12]\.md"), "a maintainers' spec file"),
    (re.compile("\u00a7"), "a spec section number"),
    (re.compile(r"seed\s+commands?\b", re.I), "a numbered command list README.md does not define"),
    (re.compile(r"SEED_COMMANDS"), "a numbered command list README.md does not define"),
    (re.compile(r"\.\./shared\b|/work/shared|\bshared/(spec|reference)\b"), "a folder outside the repository"),
    (re.compile(r"\bspec/"), "the maintainers' spec folder"),
    (re.compile(r"\b(ARCHITECTURE|ENVIRONMENT)\.md"), "a maintainers' spec file"),
    (re.compile(r"(?<![\w/])coco\.md"), "a maintainers' spec file"),
]
# docs/ktse_plus.md exists; code must name it with its folder (the maintainers had a file of that name)
KTSE_PLUS_BARE = re.compile(r"(?<![\w/])ktse_plus\.md")


def repo_text_files(root: Path = ROOT) -> list[Path]:
    """Every code, config and document file of the repository (relative paths), fixtures excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
                       and (rel_dir / d).as_posix() not in SKIP_PATHS]
        for f in filenames:
            if Path(f).suffix in TEXT_SUFFIXES:
                out.append(rel_dir / f)
    for keep in KEEP_FILES:
        if (root / keep).is_file():
            out.append(Path(keep))
    return sorted(out)


def foreign_citations(rel: Path, text: str) -> list[str]:
    """``path:line: why: text`` for each line of ``text`` that cites a document outside the repository."""
    hits = []
    is_code = rel.suffix == ".py"
    for n, line in enumerate(text.splitlines(), 1):
        whys = [why for pat, why in FOREIGN_CITATIONS if pat.search(line)]
        if is_code and KTSE_PLUS_BARE.search(line):
            whys.append("docs/ktse_plus.md without its folder")
        hits += [f"{rel.as_posix()}:{n}: {why}: {line.strip()[:120]}" for why in whys]
    return hits


def test_no_citations_of_documents_outside_the_repository():
    # this file holds the patterns and examples of what they catch
    files = [f for f in repo_text_files() if f != Path(__file__).relative_to(ROOT)]
    assert Path("README.md") in files and Path("docs/deviations.md") in files and Path("train.py") in files
    hits = []
    for rel in files:
        hits += foreign_citations(rel, (ROOT / rel).read_text(encoding="utf-8", errors="replace"))
    assert not hits, "say the fact or point to a docs/ file of this repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("line", [
    "# see stage2.md " + "\u00a7" + "1.7", "the reference (stage1.md section 4)", '"""Trains (seed command 3)."""',
    "values wrap (" + "\u00a7" + "4 item 15)", "# ../shared/realdata/MXNET_PARAMS_FORMAT.md",
    "see ENVIRONMENT.md", "defined in ktse_plus.md", "spec/coco.md"])
def test_citation_check_catches(line):
    assert foreign_citations(Path("models/x.py"), line)


def test_citation_check_allows_repository_documents():
    text = "see docs/ktse_plus.md and docs/architecture.md; the authors' README command; shared/realdata"
    assert foreign_citations(Path("models/x.py"), text) == []
    assert foreign_citations(Path("docs/deviations.md"), "[`ktse_plus.md`](ktse_plus.md)") == []


# ----------------------------------------------------------------------------------------------
# Layering: CLIs are leaves
# ----------------------------------------------------------------------------------------------

def _dotted(script: str) -> str:
    return script[:-3].replace("/", ".")


# voc12/ and coco14/ toy.py and prepare.py are library modules that also run as scripts: importing them
# is allowed, reaching their command line (main, build_parser) from an import is not.
DUAL = {"voc12.toy", "voc12.prepare", "coco14.toy", "coco14.prepare"}
CLI_MODULES = {_dotted(s) for s in CLI_SCRIPTS} - DUAL
CLI_ENTRY_ATTRS = {"main", "build_parser"}
LIBRARY_PACKAGES = ("tools", "models", "voc12", "coco14", "irn", "segmentation", "pipeline")


def _module_of(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cli_imports(rel: Path, source: str) -> list[str]:
    """``path:line: what`` for each import of a CLI module in ``source`` (the file at ``rel``), and for
    each reach of a dual module's command line through an import."""
    tree = ast.parse(source, filename=str(rel))
    package = _module_of(rel).rsplit(".", 1)[0] if "." in _module_of(rel) else ""
    if rel.name == "__init__.py":
        package = _module_of(rel)
    hits, dual_names = [], set()

    def check(name: str, node: ast.AST, bound: str | None) -> None:
        if name in CLI_MODULES:
            hits.append(f"{rel.as_posix()}:{node.lineno}: imports the CLI {name}")
        elif name in DUAL and bound:
            dual_names.add(bound)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                check(a.name, node, a.asname or (a.name if "." not in a.name else None))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".") if package else []
                up = up[:len(up) - (node.level - 1)] if node.level > 1 else up
                base = ".".join([*up, base] if base else up)
            check(base, node, None)
            for a in node.names:
                check(f"{base}.{a.name}" if base else a.name, node, a.asname or a.name)
                if base in DUAL and a.name in CLI_ENTRY_ATTRS:
                    hits.append(f"{rel.as_posix()}:{node.lineno}: imports {base}.{a.name} (run it via cli_main)")
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                check(str(node.args[0].value), node, None)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in CLI_ENTRY_ATTRS and isinstance(node.value, ast.Name)
                and node.value.id in dual_names):
            hits.append(f"{rel.as_posix()}:{node.lineno}: {node.value.id}.{node.attr} of an imported module "
                        "(run the command line via conftest.cli_main)")
    return hits


def _rule_files() -> list[Path]:
    files = [p.relative_to(ROOT) for d in ("tests", "bench", *LIBRARY_PACKAGES) if (ROOT / d).is_dir()
             for p in (ROOT / d).rglob("*.py") if "fixtures" not in p.parts and "__pycache__" not in p.parts]
    files += [Path(s) for s in CLI_SCRIPTS if "/" not in s]  # the root scripts; the others are in packages
    return sorted(set(files))


def test_no_library_cli_test_or_bench_imports_a_cli():
    files = _rule_files()
    assert Path("tests/test_train.py") in files and Path("bench/eval_speed.py") in files
    assert Path("models/ktse.py") in files and Path("train.py") in files and Path("irn/run_sample.py") in files
    hits = []
    for rel in files:
        hits += cli_imports(rel, (ROOT / rel).read_text(encoding="utf-8"))
    assert not hits, ("run a CLI through conftest.cli_main / cli_module (or as a process) and import "
                      "everything else from the library:\n" + "\n".join(hits))


@pytest.mark.parametrize("source", [
    "import train", "import infer as inf", "from irn import run_sample", "from irn import gen_mask, REPO_ROOT",
    "from segmentation import test as t", "import segmentation.main", "def f():\n    import evaluation",
    "import importlib\nm = importlib.import_module('segmentation.test')", "from . import run_sample",
    "from voc12 import toy\ntoy.main([])", "from voc12.prepare import main", "import run_pipeline"])
def test_import_rule_catches(source):
    assert cli_imports(Path("irn/x.py"), source)


def test_import_rule_allows_the_library():
    src = ("from irn import REPO_ROOT\nfrom irn.steps import gen_mask\nfrom segmentation.beco import engine\n"
           "from voc12 import toy\ntoy.generate('x')\nfrom voc12.prepare import prepare\nimport models.train_x\n"
           "from conftest import cli_main\ncli_main('train.py', [])")
    assert cli_imports(Path("tests/test_x.py"), src) == []


# ----------------------------------------------------------------------------------------------
# Pointers into docs/ resolve: the file exists and the quoted section is one of its headings
# ----------------------------------------------------------------------------------------------

DOC_REF = re.compile(r"docs/([\w-]+\.md)(?:[`)\]]*,? *\(?\"([^\"]+)\")?")


def broken_doc_pointers(rel: Path, text: str, root: Path = ROOT) -> list[str]:
    """``path:line: what`` for each ``docs/<file>.md`` (optionally followed by a quoted section name)
    in ``text`` whose file is missing or has no heading starting with that name."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in DOC_REF.finditer(line):
            doc = root / "docs" / m[1]
            if not doc.is_file():
                hits.append(f"{rel.as_posix()}:{n}: docs/{m[1]} does not exist")
            elif m[2]:
                heads = [h.lstrip("#").strip().lower() for h in doc.read_text(encoding="utf-8").splitlines()
                         if h.startswith("#")]
                if not any(h.startswith(m[2].strip().lower()) for h in heads):
                    hits.append(f"{rel.as_posix()}:{n}: docs/{m[1]} has no section \"{m[2]}\"")
    return hits


def test_docs_pointers_resolve():
    hits = []
    for rel in repo_text_files():
        if rel != Path(__file__).relative_to(ROOT):
            hits += broken_doc_pointers(rel, (ROOT / rel).read_text(encoding="utf-8", errors="replace"))
    assert not hits, "\n".join(hits)


def test_docs_pointer_check_catches():
    assert broken_doc_pointers(Path("x.py"), 'see docs/nope.md')
    assert broken_doc_pointers(Path("x.py"), 'see docs/formats.md, "No such section"')
    assert broken_doc_pointers(Path("x.py"), 'see docs/formats.md, "Metrics records"') == []
