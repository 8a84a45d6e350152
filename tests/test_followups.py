"""Follow-ups of the provenance/error-path work: the data CLIs' error path and range checks,
segmentation/test.py's range checks, one line for an interrupted pipeline, the pipeline's early input
check following the runner's own skip/redo decision, and the IRN step resuming an interrupted training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_module

from tools.errors import INTERRUPTED_MESSAGE, WSSSError


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


# ----------------------------------------------------------------------------------------------
# voc12/toy.py and voc12/prepare.py: parse-time ranges, one error line, exit 2 / 130


@pytest.mark.parametrize("argv, flag", [(["--classes", "21"], "--classes"), (["--classes", "0"], "--classes"),
                                        (["--n_train", "0"], "--n_train"), (["--n_val", "-1"], "--n_val"),
                                        (["--max_size", "8"], "--max_size"), (["--seed", "-3"], "--seed"),
                                        (["--max_size", "64", "--min_size", "80"], "--min_size")])
def test_toy_cli_refuses_out_of_range_flags(argv, flag, tmp_path, capsys):
    toy = cli_module("voc12/toy.py")

    with pytest.raises(SystemExit) as e:
        toy.main(argv + ["--out", str(tmp_path / "t")])
    assert e.value.code == 2
    err = _lines(capsys.readouterr().err)
    assert f": error: argument {flag}: must be " in err[-1], err
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_toy_cli_error_path(tmp_path, monkeypatch, capsys):
    toy = cli_module("voc12/toy.py")

    def fail(*a, **k):
        raise WSSSError("cannot write there")

    monkeypatch.setattr(toy, "generate", fail)
    assert toy.main(["--out", str(tmp_path / "t")]) == 2
    assert _lines(capsys.readouterr().err) == ["error: cannot write there"]

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "generate", stop)
    assert toy.main(["--out", str(tmp_path / "t")]) == 130
    assert _lines(capsys.readouterr().err) == [INTERRUPTED_MESSAGE]


def test_toy_cli_writes_a_small_set(tmp_path, capsys):
    toy = cli_module("voc12/toy.py")

    out = tmp_path / "t"
    assert toy.main(["--out", str(out), "--n_train", "2", "--n_val", "1", "--max_size", "32", "--classes", "3"]) == 0
    meta = json.loads((out / toy.TOY_META).read_text())
    assert meta["n_train"] == 2 and meta["classes"] == 3


def test_prepare_cli_missing_voc_root_is_one_line(tmp_path, capsys):
    prepare = cli_module("voc12/prepare.py")

    missing = tmp_path / "no_voc"
    assert prepare.main(["--voc_root", str(missing), "--out_dir", str(tmp_path / "lists")]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: VOC root not found: '{missing}'"), err
    assert not (tmp_path / "lists").exists()
    with pytest.raises(SystemExit) as e:  # a missing required flag: argparse's one line, status 2
        prepare.main(["--out_dir", str(tmp_path / "lists")])
    assert e.value.code == 2 and "error: the following arguments are required: --voc_root" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# segmentation/test.py: its own flags are range-checked


@pytest.mark.parametrize("argv, flag", [(["--n-jobs", "0"], "--n-jobs"), (["--n_jobs", "-2"], "--n-jobs"),
                                        (["--num_classes", "1"], "--num_classes"),
                                        (["--num_classes", "x"], "--num_classes")])
def test_segmentation_test_refuses_out_of_range_flags(argv, flag, tmp_path, capsys):
    test_py = cli_module("segmentation/test.py")
    with pytest.raises(SystemExit) as e:
        test_py.main(argv + ["--logits_dir", str(tmp_path)])
    assert e.value.code == 2
    assert f"error: argument {flag}" in _lines(capsys.readouterr().err)[-1]
    assert test_py.build_parser().parse_args([]).num_classes == 21  # defaults unchanged


# ----------------------------------------------------------------------------------------------
# the pipeline: one line when interrupted


def _py(code: str) -> list[str]:
    return ["python", "-c", code]


def _pipeline_with(steps: list, tmp_path: Path, monkeypatch) -> None:
    """run_pipeline.run on ``steps`` instead of a preset's, everything under ``tmp_path``."""
    run_pipeline = cli_module("run_pipeline.py")

    monkeypatch.chdir(tmp_path)  # run() changes directory; this restores it afterwards
    monkeypatch.setattr(run_pipeline, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(run_pipeline, "build_steps", lambda cfg: steps)


# a step interrupted on its own: it prints the project's interrupted line and exits 130
_SELF_INTERRUPTED = ("import sys; from tools.errors import INTERRUPTED_MESSAGE; print('working', flush=True); "
                     "print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True); sys.exit(130)")


@pytest.mark.parametrize("quiet", [False, True])
def test_interrupted_step_gives_one_interrupted_line(tmp_path, monkeypatch, capfd, quiet):
    run_pipeline = cli_module("run_pipeline.py")
    from pipeline.runner import Step

    steps = [Step("first", "data", _py("open('a.txt', 'w').write('a')"), outputs=["a.txt"]),
             Step("slow", "stage1", _py(_SELF_INTERRUPTED), outputs=["never.txt"])]
    _pipeline_with(steps, tmp_path, monkeypatch)
    assert run_pipeline.main(["--preset", "toy", "--name", "t"] + (["--quiet"] if quiet else [])) == 130
    out, err = capfd.readouterr()
    said = [x for x in _lines(out + err) if "interrupted" in x]
    assert len(said) == 1, out + err
    assert "error:" not in out + err and "exit code 130" not in out + err  # not reported as a failure
    assert _lines(err)[-1].endswith("pipeline stopped during step 'slow'; rerun the same run_pipeline.py command "
                                    "to continue (finished steps are skipped)")
    # echoed, the step's own line is the interrupted one; quiet, the pipeline's line says it
    assert _lines(err)[-1].startswith("interrupted: ") is quiet


def test_interrupted_runner_names_the_step(tmp_path, monkeypatch, capfd):
    import pipeline.runner as runner
    run_pipeline = cli_module("run_pipeline.py")
    from pipeline.runner import Step

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_command", ctrl_c)
    _pipeline_with([Step("slow", "stage1", _py("pass"), outputs=["never.txt"])], tmp_path, monkeypatch)
    assert run_pipeline.main(["--preset", "toy", "--name", "t", "--quiet"]) == 130
    assert _lines(capfd.readouterr().err) == [
        "interrupted: pipeline stopped during step 'slow'; rerun the same run_pipeline.py command to continue "
        "(finished steps are skipped)"]


# ----------------------------------------------------------------------------------------------
# the early input check follows the runner's decision


def _req_chain(a_value: str, b_value: str) -> list:
    from pipeline.runner import Step

    return [Step("a", "data", _py(f"open('a.txt', 'w').write({a_value!r})"), outputs=["a.txt"]),
            Step("b", "stage1", _py(f"open('b.txt', 'w').write({b_value!r})"), outputs=["b.txt"], needs=["a"],
                 requires=[("ext/w.pth", "B weights", "get them from X")])]


def test_early_check_covers_steps_redone_because_their_record_changed(tmp_path):
    from pipeline.runner import check_requirements, planned_decisions, run_steps
    from tools.errors import MissingFileError

    rec = tmp_path / "rec"
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "w.pth").write_bytes(b"w")
    run_steps(_req_chain("1", "1"), rec, root=tmp_path, echo=False, printer=lambda s: None)
    (tmp_path / "ext" / "w.pth").unlink()
    # nothing changed: both steps are skipped, so the missing weights are no problem yet
    check_requirements(_req_chain("1", "1"), tmp_path, record_dir=rec)
    # b's command changed: b is redone although its outputs exist, so its weights are checked first
    with pytest.raises(MissingFileError, match="B weights not found"):
        check_requirements(_req_chain("1", "2"), tmp_path, record_dir=rec)
    # a's command changed: a is redone, so b (which reads it) is redone too
    with pytest.raises(MissingFileError, match="B weights not found"):
        check_requirements(_req_chain("2", "1"), tmp_path, record_dir=rec)
    assert [d.run for d in planned_decisions(_req_chain("2", "1"), rec, tmp_path)] == [True, True]
    assert [d.run for d in planned_decisions(_req_chain("1", "1"), rec, tmp_path)] == [False, False]
    # and the runner does what the check assumed: with the weights back, b is redone
    (tmp_path / "ext" / "w.pth").write_bytes(b"w")
    res = run_steps(_req_chain("1", "2"), rec, root=tmp_path, echo=False, printer=lambda s: None)
    assert [r.skipped for r in res] == [True, False] and (tmp_path / "b.txt").read_text() == "2"


def test_early_check_names_an_unfinished_step_left_out_by_from(tmp_path):
    """``--from b`` on a run whose step a never finished: one error before b starts, naming a and the fix,
    instead of b failing on a's missing outputs (with the cause only in b's log)."""
    from pipeline.runner import check_requirements, run_steps
    from tools.errors import MissingFileError

    rec = tmp_path / "rec"
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "w.pth").write_bytes(b"w")
    only_b = _req_chain("1", "1")[1:]
    with pytest.raises(MissingFileError, match=r"step 'b' reads the outputs of step 'a', which has not finished.*--from a"):
        check_requirements(only_b, tmp_path, record_dir=rec)
    run_steps(_req_chain("1", "1"), rec, root=tmp_path, echo=False, printer=lambda s: None)
    check_requirements(only_b, tmp_path, record_dir=rec)  # a finished: nothing to say


# ----------------------------------------------------------------------------------------------
# the IRN step resumes an interrupted IRN training


@pytest.mark.parametrize("preset", ["toy", "voc"])
def test_run_sample_resumes_an_interrupted_irn_training(tmp_path, preset):
    from pipeline.plan import build_steps, default_config, paths_for
    from pipeline.runner import decide

    cfg = default_config(preset)
    step = next(s for s in build_steps(cfg) if s.name == "run_sample")
    assert "--resume" not in step.command(False, tmp_path)
    resume = tmp_path / (paths_for(cfg).irn_weights + ".resume")  # what train_irn leaves after each epoch
    resume.parent.mkdir(parents=True)
    resume.write_bytes(b"")
    assert step.command(False, tmp_path)[-2:] == ["--resume", "true"]
    assert "--resume" not in step.command(True, tmp_path)  # a redo never resumes
    assert step.command(True, tmp_path)[-1] == "--overwrite"
    # the record key is the command as typed, without the --resume extra
    d = decide(step, tmp_path / "rec", tmp_path, {"train": None})
    assert d.run and not d.redo
