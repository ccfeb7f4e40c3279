"""torchrun data parallelism on the CPU (gloo): 2 processes give the numbers and the adapter
of 1."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import (
    adapter,
    assert_adapters_close,
    error_line,
    metrics,
    standard_rows,
    train_rows,
    write_jsonl,
)

import checkpoints
import cli
import demo
import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, 18 pairs (15 to train: each epoch ends on a step of 3 pairs, split 1 + 2), and
    the single-process run every test compares with. Dropout is off: its masks are drawn per
    process."""
    folder = tmp_path_factory.mktemp("parallel")
    model = demo.build_tiny_model(folder / "model", hidden_size=32)
    dataset = write_jsonl(folder / "pairs.jsonl", standard_rows(18))
    args = ["--model", model, "--dataset", dataset, "--max-length", 32, "--max-prompt-length", 16,
            "--batch-size", 4, "--micro-batch-size", 1, "--lora-r", 4, "--lora-alpha", 8,
            "--lora-dropout", 0, "--lr", 1e-3, "--epochs", 3, "--eval-fraction", 0.2,
            "--eval-every", 4]
    args = [str(a) for a in args]
    assert train.main(args + ["--output-dir", str(folder / "single")]) == 0
    return args, folder / "single"


def torchrun(args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
               *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def assert_same_run(single, parallel):
    """Every logged number (but speed) and the final adapter equal, step by step."""
    one, two = metrics(single), metrics(parallel)
    # one line per step, no repeats
    assert [row["step"] for row in two] == [row["step"] for row in one]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"tokens_per_s", "step"}:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert_adapters_close(adapter(single), adapter(parallel), atol=1e-6)


def test_two_processes_train_exactly_as_one(setup, tmp_path):
    args, single = setup
    out = tmp_path / "run"
    process = torchrun(args + ["--output-dir", str(out), "--save-every", "2"])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert_same_run(single, out)
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]
    assert sorted(checkpoints.saved_steps(out)) == [8, 10, 12]
    tokens = [row["tokens_per_s"] for row in train_rows(out)]
    assert all(t > 0 for t in tokens)


def test_a_batch_that_cannot_be_split_is_refused(setup, tmp_path, capsys, monkeypatch):
    """The check reads WORLD_SIZE, as torchrun sets it, before any process group is joined: so it is
    tested in-process."""
    args, _ = setup
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = train.main(args + ["--output-dir", str(out), "--batch-size", "3"])
    assert code == 2
    assert error_line(capsys.readouterr().err) == (
        "error: --batch-size 3 pairs per step cannot be split evenly over 2 processes: "
        "make it a multiple of 2")
    assert not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    # train.py's own launcher checks before it starts any process
    code = train.main(args + ["--output-dir", str(out), "--batch-size", "3",
                              "--nproc-per-node", "2"])
    assert code == 2 and "over 2 processes" in error_line(capsys.readouterr().err)
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = train.main(args + ["--output-dir", str(out), "--nproc-per-node", "2"])
    assert code == 2 and "--nproc-per-node 2 under torchrun's 4" in error_line(
        capsys.readouterr().err)
    assert not out.exists()


def wait_for_steps(process, out, steps):
    """Until `steps` training steps are logged (however long loading takes), the run still on."""
    while process.poll() is None and not (
            (out / "metrics.jsonl").is_file() and len(train_rows(out)) >= steps):
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "train.py"])
def test_interrupt_and_resume_with_two_processes(launcher, setup, tmp_path):
    """SIGTERM to torchrun, or Ctrl-C to the whole terminal group of `python train.py
    --nproc-per-node 2`: every process finishes its step and saves, one resume line is said, and
    train.py's own launcher ends as one process would (143 or 130, no traceback at all)."""
    args, single = setup
    out = tmp_path / "run"
    if launcher == "torchrun":
        process = torchrun(args + ["--output-dir", str(out)])
    else:
        process = subprocess.Popen(
            [sys.executable, "train.py", "--nproc-per-node", "2", *args, "--output-dir", str(out)],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(process, out, 2)
    if launcher == "torchrun":
        process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    else:
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C: the launcher and both processes
    _, err = process.communicate(timeout=300)
    # said once, not per process
    stopped = [line for line in err.splitlines() if "stopped: " in line]
    assert len(stopped) == 1, err
    assert f"python train.py --nproc-per-node 2 --resume {out}" in stopped[0], err
    if launcher == "train.py":
        assert process.returncode == 130 and "Traceback" not in err, err
    else:  # torchrun's own launcher adds its traceback; none of ours
        assert "Traceback (most recent call last):\n  File \"" + str(REPO) not in err
    step = max(checkpoints.saved_steps(out))
    assert 2 <= step < 12
    (out / ".tmp-checkpoint-99" / "left").mkdir(parents=True)  # as a crash while saving leaves it
    process = torchrun(["--resume", str(out)])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert_same_run(single, out)
    # a resume must keep the world size: the run's RNG states are one per process
    assert checkpoints.resume_conflicts({"world_size": 2}, {"world_size": 1})
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2


def test_degenerate_samples_stop_every_process_together(tmp_path):
    """The first process samples; all stop at the same step, the run folder keeps the healthy
    model, and train.py's launcher ends with the one process's exit status."""
    from test_health import collapsing, planted_collapse
    model_dir = demo.build_tiny_model(tmp_path / "tiny", hidden_size=32)
    collapse = planted_collapse(model_dir, tmp_path)
    out = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "train.py", "--nproc-per-node", "2",
         *map(str, collapsing(collapse, out, "--stop-on-degeneration", "--lora-dropout", 0))],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=600)
    assert process.returncode == cli.DEGENERATED, process.stderr
    stopped = [line for line in process.stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "the run folder's model is step 2's" in stopped[0]
    assert checkpoints.saved_steps(out) == {2: out}
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5, 6]
