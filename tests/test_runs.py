"""Long runs never lose work: signals, divergence, crashes while saving, resumes that must match the
run, checkpoint files that cannot run code, and an output folder that is never shared or wrongly
emptied."""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_train import (
    adapter,
    assert_adapters_close,
    error_line,
    metrics,
    run,
    small_args,
    standard_rows,
    train_rows,
    write_jsonl,
)

import checkpoints
import demo
import simpo
import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32)


def long_run(model, dataset, out, *extra):
    """Many short steps and no checkpoint flags: what a user types, made small."""
    return small_args(model, dataset, out, "--max-steps", 40, "--batch-size", 2, "--lr", 1e-3,
                      *extra)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    dataset = write_jsonl(folder / "pairs.jsonl", standard_rows(16))
    assert train.main([str(a) for a in long_run(model_dir, dataset, folder / "run")]) == 0
    return dataset, folder / "run"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resume_matches(signum, model_dir, uninterrupted, tmp_path,
                                                        capsys):
    dataset, reference = uninterrupted
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "train.py",
                                *map(str, long_run(model_dir, dataset, out))],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    # a few steps in (however long loading takes), then the signal
    while process.poll() is None and not (
            (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and f"python train.py --resume {out}" in stopped[0], err
    step = max(checkpoints.saved_steps(out))
    assert 1 <= step < 40 and (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no final save: the run did not finish
    code, stdout, err = run(["--resume", out], capsys)
    assert code == 0, err
    assert f"resuming from {out / f'checkpoint-{step}'} (step {step})" in stdout
    assert_adapters_close(adapter(reference), adapter(out), atol=1e-5)
    assert [row["step"] for row in train_rows(out)] == list(range(1, 41))


def test_a_non_finite_loss_stops_before_the_update(model_dir, tmp_path, capsys, monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    real_loss, calls = simpo.simpo_loss, []

    def loss_that_breaks_at_step_5(chosen_logps, *args, **kwargs):
        calls.extend([1] * chosen_logps.requires_grad)  # training steps only, not the flag checks
        losses, chosen, rejected = real_loss(chosen_logps, *args, **kwargs)
        return (losses * float("nan") if len(calls) == 5 else losses), chosen, rejected

    monkeypatch.setattr(simpo, "simpo_loss", loss_that_breaks_at_step_5)  # one micro-batch per step
    code, _, err = run(long_run(model_dir, dataset, out, "--save-every", 2,
                                "--micro-batch-size", 2), capsys)
    assert code == 3
    line = [line for line in err.splitlines() if line.startswith("error: ")]
    assert (len(line) == 1 and "step 5: non-finite loss" in line[0]
            and "training pairs [" in line[0]), err
    assert "Traceback" not in err
    assert sorted(checkpoints.saved_steps(out)) == [2, 4]  # the last good ones, nothing after
    for folder in checkpoints.saved_steps(out).values():
        state = torch.load(folder / "training_state.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert all(all(v == v for v in row.values() if isinstance(v, float)) for row in metrics(out))
    assert [row["step"] for row in train_rows(out)] == [1, 2, 3, 4]

    # --skip-nonfinite: the step is skipped, logged without numbers (tensorboard, where installed,
    # gets its lr alone), and the run finishes with finite weights
    calls.clear()
    skipped = tmp_path / "skipped"
    report = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    code, stdout, err = run(long_run(model_dir, dataset, skipped, "--skip-nonfinite", *report),
                            capsys)
    assert code == 0, err
    assert "skipped step 5: non-finite" in stdout + err
    assert {"step": 5, "skipped": "non-finite"}.items() <= metrics(skipped)[4].items()
    if report:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(skipped / "tensorboard"))
        events.Reload()
        assert 5 in [event.step for event in events.Scalars("lr")]
        assert 5 not in [event.step for event in events.Scalars("loss")]
    assert all(torch.isfinite(t).all() for t in adapter(skipped).values())


def test_a_crash_while_saving_leaves_the_previous_checkpoint(model_dir, tmp_path, capsys,
                                                             monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    args = long_run(model_dir, dataset, tmp_path / "whole", "--max-steps", 6, "--save-every", 2)
    assert run(args, capsys)[0] == 0
    out = tmp_path / "crashed"
    real_save, saves = torch.save, []

    def save_that_dies_halfway_through_the_second_checkpoint(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half a file")
            raise SystemExit("killed")  # as a SIGKILL would leave it, minus the process
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save",
                        save_that_dies_halfway_through_the_second_checkpoint)
    with pytest.raises(SystemExit):
        train.main([str(a) for a in args[:5] + [out] + args[6:]])
    monkeypatch.undo()
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    assert sorted(checkpoints.saved_steps(out)) == [2]
    code, stdout, err = run(["--resume", out], capsys)
    assert code == 0, err
    assert "(step 2)" in stdout and not (out / ".tmp-checkpoint-4").exists()
    assert_adapters_close(adapter(tmp_path / "whole"), adapter(out), atol=1e-6)


def test_a_crash_in_the_final_save_of_a_resumed_finished_run_leaves_a_step_to_resume(
        model_dir, tmp_path, capsys, monkeypatch):
    """A finished run resumed for more steps: its final save is overwritten by the new one. A crash
    halfway through that write must leave a complete save of the new last step, not only older
    checkpoints."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    whole, out = tmp_path / "whole", tmp_path / "run"
    for folder in (whole, out):
        assert run(long_run(model_dir, dataset, folder, "--max-steps", 2), capsys)[0] == 0
    assert run(["--resume", whole, "--max-steps", 4], capsys)[0] == 0
    real_write = checkpoints.write

    def write_that_dies_in_the_run_folder(model, tokenizer, folder, state):
        if Path(folder) == out:
            (out / "adapter_model.safetensors").write_bytes(b"half a file")
            raise SystemExit("killed")
        return real_write(model, tokenizer, folder, state)

    monkeypatch.setattr(checkpoints, "write", write_that_dies_in_the_run_folder)
    with pytest.raises(SystemExit):
        train.main(["--resume", str(out), "--max-steps", "4"])
    monkeypatch.undo()
    assert max(checkpoints.saved_steps(out)) == 4
    code, stdout, err = run(["--resume", out, "--max-steps", 4], capsys)
    assert code == 0, err
    assert "(step 4)" in stdout and max(checkpoints.saved_steps(out)) == 4
    assert_adapters_close(adapter(whole), adapter(out), atol=1e-6)


def file_states(folder):
    """Every file under `folder` with its content hash and modification time, and every folder."""
    def state(path):
        if not path.is_file():
            return "folder"
        return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    return {p.relative_to(folder): state(p) for p in sorted(Path(folder).rglob("*"))}


@pytest.fixture(scope="module")
def resumable(model_dir, tmp_path_factory):
    """A finished 2-step run with a checkpoint after step 1, on 16 pairs with nothing held out, and
    the inputs a resume could swap in: a copy of the model, the same data under another name."""
    folder = tmp_path_factory.mktemp("resumable")
    dataset = write_jsonl(folder / "pairs.jsonl", standard_rows(16))
    args = long_run(model_dir, dataset, folder / "run", "--max-steps", 2, "--save-every", 1)
    assert train.main([str(a) for a in args]) == 0
    assert sorted(checkpoints.saved_steps(folder / "run")) == [1, 2]
    other_model = shutil.copytree(model_dir, folder / "other-model")
    # the same rows under another name
    other_data = write_jsonl(folder / "other.jsonl", standard_rows(16))
    return SimpleNamespace(run=folder / "run", dataset=Path(dataset), model=other_model,
                           data=other_data)


OTHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] + ' <|end|> ' }}"
                  "{% endfor %}")
# One change per setting the run fixes (the run: long_run, --max-steps 2, in the resumable folder).
CHANGES = {"model": lambda r: ["--model", r.model], "full": ["--full"],
           "load_in_4bit": ["--load-in-4bit"],
           "lora_r": ["--lora-r", 8], "lora_alpha": ["--lora-alpha", 16],
           "lora_target": ["--lora-target", "q_proj,v_proj"],
           "chat_template": ["--chat-template", OTHER_TEMPLATE],
           "dataset": lambda r: ["--dataset", r.data], "split": ["--split", "test"],
           "eval_split": ["--eval-split", "test"], "eval_fraction": ["--eval-fraction", 0.25],
           "max_length": ["--max-length", 48], "max_prompt_length": ["--max-prompt-length", 8],
           "data_fingerprint": [], "beta": ["--beta", 5], "gamma": ["--gamma", 1],
           "sft_weight": ["--sft-weight", 0.5],
           "no_length_normalization": ["--no-length-normalization"],
           "batch_size": ["--batch-size", 4], "seed": ["--seed", 1], "world_size": []}
SAYS = {"data_fingerprint": "training pairs with fingerprint",
        "world_size": "2 processes where the run had 1 (resume with as many)"}


def test_every_setting_the_run_fixes_has_a_refused_resume():
    assert set(CHANGES) == set(checkpoints.FIXED_BY_THE_RUN)


@pytest.mark.parametrize("key", CHANGES)
def test_resume_refuses_each_setting_the_run_fixes(key, resumable, capsys, monkeypatch):
    """A real --resume (that would train on to step 3) with one fixed setting changed: exit 2, one
    line naming the setting, and the run folder exactly as it was: no file written, touched or
    removed."""
    flags = CHANGES[key](resumable) if callable(CHANGES[key]) else CHANGES[key]
    saved = resumable.dataset.read_text()
    if key == "data_fingerprint":  # the same file with other content
        rows = [json.loads(line) for line in saved.splitlines()]
        write_jsonl(resumable.dataset, rows[:-1] + [rows[0]])
    if key == "world_size":
        # as under torchrun with 2 processes: WORLD_SIZE, and a process group joined (of this
        # process alone: the refusal comes before any collective call)
        monkeypatch.setenv("WORLD_SIZE", "2")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    before = file_states(resumable.run)
    try:
        code, _, err = run(["--resume", resumable.run, "--max-steps", 3, *flags], capsys)
    finally:
        resumable.dataset.write_text(saved)
        if dist.is_initialized():
            dist.destroy_process_group()
    assert code == 2, err
    line = error_line(err)
    assert SAYS.get(key, f"--{key.replace('_', '-')} ") in line, line
    assert "start a new run instead" in line, line
    assert file_states(resumable.run) == before


def test_resume_allows_and_prints_settings_that_only_change_the_future(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    assert run(long_run(model_dir, dataset, out, "--max-steps", 2), capsys)[0] == 0
    code, stdout, err = run(["--resume", out, "--max-steps", 4, "--eval-every", 2,
                             "--save-every", 3], capsys)
    assert code == 0, err
    assert "--max-steps 4" in stdout and "--eval-every 2" in stdout and "--save-every 3" in stdout
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 4


def test_resuming_a_finished_run_with_other_flags_rewrites_nothing(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    assert run(long_run(model_dir, dataset, out, "--max-steps", 2), capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, err = run(["--resume", out, "--max-steps", 2, "--eval-every", 7], capsys)
    assert code == 0 and "finished all 2 steps already" in stdout, err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_takes_the_newest_save_and_ignores_other_folders(model_dir, tmp_path, capsys,
                                                                monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    assert run(long_run(model_dir, dataset, out, "--max-steps", 4), capsys)[0] == 0
    (out / "checkpoint-2-backup").mkdir()  # somebody's copy: not a checkpoint, never deleted
    real_loss, calls = simpo.simpo_loss, []

    def loss_that_breaks_at_step_9(chosen_logps, *args, **kwargs):  # dies after checkpoint-8
        calls.extend([1] * chosen_logps.requires_grad)
        losses, chosen, rejected = real_loss(chosen_logps, *args, **kwargs)
        return (losses * float("nan") if len(calls) == 5 else losses), chosen, rejected

    monkeypatch.setattr(simpo, "simpo_loss", loss_that_breaks_at_step_9)
    code, _, err = run(["--resume", out, "--max-steps", 12, "--save-every", 2], capsys)
    assert code == 3 and "step 9" in err
    monkeypatch.undo()
    # the final save of step 4, and two checkpoints
    assert sorted(checkpoints.saved_steps(out)) == [4, 6, 8]
    code, stdout, err = run(["--resume", out], capsys)
    assert code == 0, err
    assert "(step 8)" in stdout
    assert (out / "checkpoint-2-backup").is_dir()


def test_keep_checkpoints_deletes_only_older_checkpoints(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    args = long_run(model_dir, dataset, out, "--max-steps", 3, "--save-every", 1,
                    "--keep-checkpoints", 3)
    assert run(args, capsys)[0] == 0
    (out / "checkpoint-1-notes").mkdir()  # not a checkpoint: a later prune leaves it alone
    code, _, err = run(["--resume", out, "--max-steps", 7], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1-notes", "checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert sorted(checkpoints.saved_steps(out)) == [4, 5, 6, 7]

    # by the clock: a checkpoint whenever the minutes have passed (here: after every step)
    clock = tmp_path / "clock"
    code, _, err = run(long_run(model_dir, dataset, clock, "--max-steps", 4,
                                "--save-every-minutes", 1e-6),
                       capsys)
    assert code == 0, err
    assert sorted(checkpoints.saved_steps(clock)) == [2, 3, 4]


def test_resume_without_a_checkpoint_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": model_dir}))
    code, _, err = run(["--resume", out], capsys)
    assert code == 2 and "no checkpoint there" in error_line(err)


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PLANTED_MARKER'])}",))


def test_a_checkpoint_holding_a_pickle_is_refused_not_run(model_dir, tmp_path, capsys, monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    assert run(long_run(model_dir, dataset, out, "--max-steps", 4, "--save-every", 2),
               capsys)[0] == 0
    (out / "checkpoint.json").unlink()  # the run "died" before its final save: checkpoint-2 is next
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    state_file = out / "checkpoint-2" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["rng"][0]["python"] = Planted()
    torch.save(state, state_file)
    code, _, err = run(["--resume", out], capsys)
    assert code == 2 and "cannot be loaded safely" in error_line(err)
    assert not marker.exists()


def test_overwrite_empties_only_a_run_folder_that_holds_no_input(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dataset = write_jsonl(out / "pairs.jsonl", standard_rows(16))
    code, _, err = run(long_run(model_dir, dataset, out, "--max-steps", 1, "--overwrite"), capsys)
    # e.g. --output-dir . never emptied
    assert code == 2 and "holds no earlier run" in error_line(err)
    (out / "run_config.json").write_text("{}")
    code, _, err = run(long_run(model_dir, dataset, out, "--max-steps", 1, "--overwrite"), capsys)
    assert code == 2 and "an input of this run" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "run_config.json"]


def test_runs_started_together_get_their_own_default_folders(model_dir, tmp_path, capsys,
                                                             monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "runs/same-second")
    args = long_run(model_dir, dataset, "unused", "--max-steps", 1)
    del args[4:6]  # no --output-dir
    for _ in range(2):
        assert run(args, capsys)[0] == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["same-second", "same-second-2"]
    assert all((p / "adapter_model.safetensors").is_file() for p in runs)


def test_out_of_memory_is_one_line_with_the_flags_that_help(model_dir, tmp_path, capsys,
                                                            monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"

    def no_memory(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run(long_run(model_dir, dataset, out, "--max-steps", 2, "--save-every", 1),
               capsys)[0] == 0
    before = (out / "checkpoint-1" / "training_state.pt").read_bytes()
    (out / "checkpoint.json").unlink()
    monkeypatch.setattr(train, "train_step", no_memory)
    code, _, err = run(["--resume", out, "--max-steps", 4], capsys)
    line = error_line(err)
    assert code == 1 and "out of memory" in line and "--micro-batch-size 2" in line
    assert ("--max-length" in line and "--gradient-checkpointing" in line
            and "--load-in-4bit" in line)
    assert (out / "checkpoint-1" / "training_state.pt").read_bytes() == before


def test_model_code_runs_only_with_trust_remote_code(model_dir, tmp_path, capsys):
    model = tmp_path / "custom"
    shutil.copytree(model_dir, model)
    marker = tmp_path / "ran"
    (model / "custom_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    # not a model transformers knows: only its own code can load it
    config["model_type"] = "custom-llama"
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig",
                          "AutoModelForCausalLM": "custom_model.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    code, _, err = run(long_run(str(model), dataset, tmp_path / "run", "--max-steps", 1), capsys)
    assert code == 2 and "--trust-remote-code" in error_line(err)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_the_data_fingerprint_sees_content_and_order_not_layout():
    import numpy as np

    import preferences

    def examples(pairs, pad=0):  # the same pairs, stored with `pad` unrelated ids before them
        columns = {}
        for key in ("prompt", "chosen", "rejected"):
            ids = [list(range(900, 900 + pad))] + [pair[key] for pair in pairs]
            starts = np.cumsum([0] + [len(part) for part in ids])
            columns[key] = (np.array(sum(ids, []), dtype=np.int32), starts)
        return preferences.Examples(columns, np.arange(1, len(pairs) + 1))

    pairs = [{"prompt": [1, 2], "chosen": [3], "rejected": [4, 5]},
             {"prompt": [6], "chosen": [7], "rejected": [8]}]
    same = examples(pairs).fingerprint()
    assert examples(pairs, pad=3).fingerprint() == same
    assert examples(pairs[::-1]).fingerprint() != same
    changed = [dict(pairs[0], chosen=[3, 4], rejected=[5]), pairs[1]]  # same ids, other split
    assert examples(changed).fingerprint() != same


def test_a_run_with_gamma_beta_ratio_resumes_and_keeps_its_gamma(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    args = long_run(model_dir, dataset, out, "--max-steps", 2, "--beta", 10,
                    "--gamma-beta-ratio", 0.3)
    assert run(args, capsys)[0] == 0
    code, _, err = run(["--resume", out, "--max-steps", 3], capsys)
    assert code == 0, err
    # the same γ, as a number
    code, _, err = run(["--resume", out, "--max-steps", 4, "--gamma", 3], capsys)
    assert code == 0, err
    code, _, err = run(["--resume", out, "--max-steps", 5, "--gamma", 2], capsys)
    assert code == 2 and "--gamma 2.0 (the run used 3.0)" in error_line(err)


def signal_during(monkeypatch, function, signum, calls_before):
    """Make `train.<function>` send this process `signum` on its call number `calls_before + 1`."""
    real, calls = getattr(train, function), []

    def with_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == calls_before + 1:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, function, with_signal)


def test_a_signal_in_the_last_step_still_finishes_the_run(model_dir, tmp_path, capsys, monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    signal_during(monkeypatch, "train_step", signal.SIGTERM, calls_before=3)  # in step 4 of 4
    code, stdout, err = run(long_run(model_dir, dataset, out, "--max-steps", 4,
                                     "--eval-fraction", 0.25),
                            capsys)
    assert code == 128 + signal.SIGTERM
    assert ("SIGTERM during the last step: the final save is complete" in err
            and "Traceback" not in err)
    assert (checkpoints.saved_steps(out) == {4: out}
            and (out / "adapter_model.safetensors").is_file())
    monkeypatch.undo()
    code, stdout, err = run(["--resume", out], capsys)
    assert code == 0 and "finished all 4 steps already" in stdout, err


def test_ctrl_c_in_the_final_evaluation_stops_the_run(model_dir, tmp_path, capsys, monkeypatch):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    out = tmp_path / "run"
    signal_during(monkeypatch, "evaluate", signal.SIGINT, calls_before=1)  # the one after training
    code, _, err = run(long_run(model_dir, dataset, out, "--max-steps", 2, "--eval-fraction", 0.25),
                       capsys)
    assert code == 130 and "interrupted: the run folder keeps its last complete save" in err
    assert "Traceback" not in err
    assert checkpoints.saved_steps(out) == {2: out}  # the final save came before the evaluation


def test_a_demo_run_resumes_naming_only_the_flags_that_changed(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(["--output-dir", out, "--max-steps", 2, "--save-every", 1], capsys)
    assert code == 0, err
    code, stdout, err = run(["--resume", out, "--max-steps", 3], capsys)
    assert code == 0, err
    assert "continuing with --max-steps 3\n" in stdout and "--demo" not in stdout
