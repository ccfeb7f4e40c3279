"""The README is the front door: its commands and flags must be the ones the code has."""
import importlib.util
import re
from pathlib import Path

import pytest

import eval as evaluate
import merge
import onpolicy
import train

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def help_flags(parse_args, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9-]+", capsys.readouterr().out)) - {"--help"}


def test_readme_test_command_is_what_ci_runs():
    ci_commands = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "    python -m pytest -q" in README.splitlines()
    assert "python -m pytest -q" in ci_commands


def test_readme_quick_start_runs_the_demo_then_evaluates_it():
    command = ("    pip install -r requirements.txt && python train.py "
               "&& python eval.py --adapter runs/demo")
    assert command in README
    assert train.parse_args([]).output_dir == "runs/demo"


def test_every_train_flag_is_documented_and_every_documented_flag_exists(capsys):
    train_flags = help_flags(train.parse_args, capsys)
    assert {f for f in train_flags if f not in README} == set(), (
        "train.py flags missing from the README")
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from torch.distributed.run import get_args_parser  # torchrun's own flags, for "More GPUs"
    torchrun_flags = {flag for action in get_args_parser()._actions
                      for flag in action.option_strings}
    known = (train_flags
             | help_flags(evaluate.parse_args, capsys)
             | help_flags(onpolicy.parse_args, capsys)
             | help_flags(merge.parse_args, capsys)
             | help_flags(bench.main, capsys)
             | torchrun_flags
             | {"--help", "--index-url"})
    assert set(re.findall(r"--[a-z][a-z0-9-]+", README)) - known == set(), \
        "README flags the code does not have"


def test_readme_conversational_command_trains(tmp_path, capsys):
    """The README's run on data/demo-chat as written, with runs/ moved under tmp_path, for the first
    of its 4 epochs: held-out accuracy is at 0.9 by then (test_offline_demo runs the demo's own 4
    epochs)."""
    import demo
    line = next(line.strip() for line in README.splitlines() if "--dataset data/demo-chat" in line)
    argv = [arg.replace("runs/", f"{tmp_path}/runs/") for arg in line.split()[2:]]
    assert "--epochs 4" in line
    demo.build_tiny_model(tmp_path / "runs" / "demo-model")
    argv = [arg.replace("data/", f"{ROOT}/data/") for arg in argv]
    assert train.main(argv + ["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy after training: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.9, out


def test_demo_data_is_what_demo_py_writes(tmp_path):
    import demo
    demo.write_data(tmp_path / "demo")
    for folder in ("demo", "demo-chat"):
        for name in ("train.jsonl", "test.jsonl"):
            assert ((tmp_path / folder / name).read_text()
                    == (ROOT / "data" / folder / name).read_text())
