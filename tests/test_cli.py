"""The tools' error handling (sparse_detr/engine/cli.py): a user's mistake is its message alone with exit code 3,
Ctrl-C one line with the command that resumes, a bug a traceback; --debug / SPARSE_DETR_DEBUG show tracebacks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_detr.config import ConfigError
from sparse_detr.engine.cli import DEBUG_ENV, EXIT_INTERRUPTED, EXIT_USER_ERROR, run_tool
from sparse_detr.engine.training.train import TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]


def _raises(error):
    def main(argv):
        raise error
    return main


def test_user_error_is_one_message_and_a_distinct_exit_code(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_tool(_raises(ConfigError("c.yaml: unknown key `train.lrr`")), ["--config", "c.yaml"]) \
        == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.endswith("error: c.yaml: unknown key `train.lrr`\n") and "Traceback" not in err
    assert EXIT_USER_ERROR not in (0, 1, 2)  # not success, a crash, or argparse's usage error
    for debug in (["--debug"], []):
        if not debug:
            monkeypatch.setenv(DEBUG_ENV, "1")
        with pytest.raises(ConfigError):
            run_tool(_raises(ConfigError("x")), debug)


def test_bug_keeps_its_traceback_and_debug_flag_is_not_passed_on(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(ZeroDivisionError):
        run_tool(_raises(ZeroDivisionError("a bug")), [])
    seen = []
    assert run_tool(seen.append, ["--config", "c.yaml", "--debug"]) == 0
    assert seen == [["--config", "c.yaml"]]


def test_ctrl_c_is_one_line_with_the_resume_command(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])
    error = TrainingInterrupted("interrupted in epoch 2 after batch 5 (global step 25); the last checkpoint is x")
    argv = ["--config", "c.yaml", "--resume", "old.pth", "train.output_dir=out dir"]
    assert run_tool(_raises(error), argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "global step 25" in err
    assert err.rstrip().endswith("resume with: python tools/train.py --config c.yaml 'train.output_dir=out dir' "
                                 "--resume auto")
    assert run_tool(_raises(KeyboardInterrupt()), []) == EXIT_INTERRUPTED  # other tools: just "interrupted"
    assert capsys.readouterr().err == "train.py: interrupted\n"


def test_worker_traceback_is_cut_from_the_message(capsys):
    from sparse_detr.data.coco import ImageError

    text = ("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    pil = Image.open(path)\n'
            "PIL.UnidentifiedImageError: cannot identify image file\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            'Traceback (most recent call last):\n  File "x.py", line 5, in f\n    raise ImageError(m)\n'
            "sparse_detr.data.coco.ImageError: cannot read image /d/val/000001.png (image id 2): truncated")
    assert run_tool(_raises(ImageError(text)), []) == EXIT_USER_ERROR
    assert capsys.readouterr().err.endswith("error: cannot read image /d/val/000001.png (image id 2): truncated\n")


def test_train_tool_prints_a_misspelled_key_alone(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(DEBUG_ENV, None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config",
                           str(REPO / "configs" / "demo_synthetic.yaml"), "train.lrr=1",
                           f"train.output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.startswith("train.py: error: command-line override 'train.lrr=1': unknown key `train.lrr` "
                                  "(did you mean `train.lr`?)") and "Traceback" not in proc.stderr


def _entry_point(tool: str) -> str:
    """The function a tool's `if __name__ == "__main__":` block hands to run_tool (the source, parsed)."""
    import ast

    tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
    guard, = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    call, = guard.body
    text = ast.unparse(call)
    assert text.startswith("sys.exit(run_tool(") and text.endswith("))"), f"tools/{tool}.py: {text}"
    return text[len("sys.exit(run_tool("):-2]


def test_every_tool_exits_through_run_tool():
    """Each tools/*.py script passes its entry point to run_tool, so what the in-process tests below call is what
    the script runs (one real interpreter: test_train_tool_prints_a_misspelled_key_alone)."""
    names = {path.stem: _entry_point(path.stem) for path in (REPO / "tools").glob("*.py")}
    assert len(names) >= 15 and set(names.values()) <= {"main", "_checked"}, names


@pytest.mark.parametrize("tool", ["predict", "export_onnx", "convert_official", "inspect_selection", "eval",
                                  "visualize"])
def test_every_tool_reports_a_truncated_checkpoint_in_one_line(tool, tmp_path, capsys, monkeypatch):
    import importlib

    from PIL import Image

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"PK\x03\x04 a checkpoint cut short")
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    argv = {"predict": ["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "p")],
            "export_onnx": ["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")],
            "convert_official": [str(ckpt), str(tmp_path / "out.pth"), "--config",
                                 str(REPO / "configs" / "sparse_detr_r50_rho0.1.yaml")],
            "inspect_selection": ["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), "--out",
                                  str(tmp_path / "i")],
            "eval": ["--checkpoint", str(ckpt)],
            "visualize": ["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "v")],
            }[tool]
    entry = getattr(importlib.import_module(f"tools.{tool}"), _entry_point(tool))
    code = run_tool(entry, argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err and "c.pth" in err and len(err.strip().splitlines()) == 1, err


def test_a_full_disk_and_too_few_classes_are_one_line_not_a_traceback(capsys):
    import errno

    from sparse_detr.data import LabelMap
    from sparse_detr.engine.training.builders import check_num_classes

    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "outputs/run/.checkpoint_last.pth.abcd1234.tmp"
    assert run_tool(_raises(full), []) == EXIT_USER_ERROR
    assert "No space left on device" in capsys.readouterr().err

    def too_few(argv):
        check_num_classes(LabelMap([1, 2, 3], ["a", "b", "c"]), 2, "val.json")

    assert run_tool(too_few, []) == EXIT_USER_ERROR
    assert "val.json has 3 categories but model.num_classes is 2" in capsys.readouterr().err
    with pytest.raises(OSError):  # any other OSError stays a bug report with its traceback
        run_tool(_raises(OSError(errno.EIO, "Input/output error")), [])
