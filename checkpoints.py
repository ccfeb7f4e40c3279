"""Checkpoints a long run can trust: written whole or not at all, loaded without running any code, and
resumed only into the run they came from. train.py's loop calls `Checkpointer.after_step` once per step.

A run folder holds the final save at its top (adapter or model, tokenizer, training_state.pt) and the
newest `--keep-checkpoints` folders `checkpoint-<step>/` of the same form. `--resume` continues from
whichever of them has the highest step.
"""
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import parallel
from modeling import UsageError

# Settings that change what the finished steps meant: a resume may not change them. Every other setting
# (--max-steps, --epochs, --lr schedule, --eval-every, --save-every, --report-to, ...) only changes what
# comes next, and is allowed.
FIXED_BY_THE_RUN = ("model", "full", "load_in_4bit", "lora_r", "lora_alpha", "lora_target", "chat_template",
                    "dataset", "split", "eval_split", "eval_fraction", "max_length", "max_prompt_length",
                    "data_fingerprint", "beta", "gamma", "sft_weight", "no_length_normalization",
                    "batch_size", "seed", "world_size")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # exactly this: a "checkpoint-2-backup" folder is not one


def resume_conflicts(saved, current):
    """The settings of `current` that differ from the run's `saved` ones and may not change on resume."""
    def same(key):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, float) or isinstance(b, float):
            return a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(a))
        return a == b
    described = {"data_fingerprint": "training pairs with fingerprint {} (the run's: {})",
                 "world_size": "{} processes where the run had {} (resume with as many)"}
    return [described.get(key, f"--{key.replace('_', '-')} {{}} (the run used {{}})").format(
        current.get(key), saved.get(key))
        for key in FIXED_BY_THE_RUN if key in current and key in saved and not same(key)]


def saved_steps(run_dir):
    """{step: folder} of every complete save in `run_dir`: the final one and each checkpoint-<step>."""
    found = {}
    for folder in [Path(run_dir), *Path(run_dir).glob("checkpoint-*")]:
        marker = folder / "checkpoint.json"  # written last: its presence means the save is complete
        if (folder == Path(run_dir) or CHECKPOINT.fullmatch(folder.name)) and marker.is_file():
            found[json.loads(marker.read_text())["step"]] = folder
    return found


def training_state(model, optimizer, step):
    """Everything `--resume` needs to continue exactly: tensors, numbers and strings only. The RNG states
    of every process (dropout masks are drawn per process): all processes must call this together."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return {"step": step, "optimizer": optimizer.state_dict(), "rng": parallel.objects(rng),
            "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}


def write(model, tokenizer, folder, state):
    """Adapter (or model) in the usual format, the tokenizer, and the training state, into `folder`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 leaves `legacy` out of the saved tokenizer_config.json; reloaded without it, a
    # SentencePiece tokenizer (Mistral, Llama-2) puts "▁" before text after a special token ("<s>[INST]"),
    # so the copy would tokenize differently from the model's own tokenizer.
    if getattr(tokenizer, "legacy", None) is not None:
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "legacy": tokenizer.legacy}, indent=2,
                                          ensure_ascii=False))
    torch.save(state, Path(folder) / "training_state.pt")
    (Path(folder) / "checkpoint.json").write_text(json.dumps({"step": state["step"]}))


def save_final(model, tokenizer, run_dir, state):
    """The final save goes to the run folder itself, where eval.py and PeftModel look for it. Its marker is
    removed first, so a crash halfway leaves a folder that --resume does not trust (it takes the newest
    checkpoint instead)."""
    (Path(run_dir) / "checkpoint.json").unlink(missing_ok=True)
    write(model, tokenizer, run_dir, state)


def restore(model, optimizer, folder):
    """Load a save written by `write` into model and optimizer; returns its step. `weights_only=True`: a
    state file that holds anything but tensors and plain values (a planted pickle) is refused, never run."""
    try:
        state = torch.load(Path(folder) / "training_state.pt", weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--resume: {folder}/training_state.pt cannot be loaded safely, refusing it: "
                         f"{reason[:200]}") from None
    # strict=False: frozen weights are not in the state
    if model.load_state_dict(state["trainable"], strict=False).unexpected_keys:
        raise UsageError(f"--resume {folder}: the checkpoint does not fit this model "
                         f"(other --lora-target or --full?)")
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"][parallel.rank()]  # this process's own (a resume keeps the world size)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


class StopRequested(Exception):
    """The run stopped early on purpose (signal, divergence, out of memory): message and exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class Checkpointer:
    """Saves every `save_every` steps, every `save_minutes` minutes, and when SIGTERM (preemption) or
    SIGINT (Ctrl-C) arrives: the signal only sets a flag, the current optimizer step finishes, then a
    checkpoint is written and the run stops. Use as a context manager around the loop."""

    def __init__(self, model, tokenizer, optimizer, run_dir, save_every=0, save_minutes=0.0, keep=2):
        self.model, self.tokenizer, self.optimizer, self.run_dir = model, tokenizer, optimizer, Path(run_dir)
        self.save_every, self.save_seconds, self.keep = save_every, 60 * save_minutes, keep
        self.signal, self.last_save = None, time.monotonic()
        for leftover in self.run_dir.glob(".tmp-checkpoint-*") if parallel.rank() == 0 else []:
            shutil.rmtree(leftover)  # what a crash while saving left behind

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _request_stop(self, signum, _frame):
        if self.signal is None and parallel.rank() == 0:  # a second Ctrl-C changes nothing
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
                  file=sys.stderr, flush=True)
        self.signal = signum

    def after_step(self, step, last_step):
        """Call after each optimizer step (1-based `step`), in every process; raises StopRequested after
        a signal."""
        due = (self.save_every and step % self.save_every == 0) or \
            (self.save_seconds and time.monotonic() - self.last_save >= self.save_seconds)
        # Processes see the clock and the signal at slightly different moments: all act on the first.
        due, signum = parallel.agree(int(bool(due) and step < last_step), self.signal or 0)
        # A signal that lands after the flags were read stays set for the next step: never lost.
        self.signal = signum or self.signal
        if step == last_step:  # the final save comes next anyway
            return
        if due or signum:
            self.save(step)
        if signum:
            world = parallel.world_size()
            launch = f"torchrun --nproc-per-node {world}" if world > 1 else "python"
            raise StopRequested(f"{signal.Signals(signum).name} after step {step}: checkpoint saved; resume "
                                f"with: {launch} train.py --resume {self.run_dir}", 128 + signum)

    def save(self, step):
        """checkpoint-<step>/, written to a temporary folder and renamed into place, so a crash while
        saving leaves the previous checkpoints as they were; then only the newest `keep` are kept."""
        state = training_state(self.model, self.optimizer, step)  # in every process; one writes
        self.last_save = time.monotonic()  # the clock restarts when the checkpoint starts
        if parallel.rank() != 0:
            return
        final, temporary = self.run_dir / f"checkpoint-{step}", self.run_dir / f".tmp-checkpoint-{step}"
        shutil.rmtree(temporary, ignore_errors=True)
        write(self.model, self.tokenizer, temporary, state)
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(temporary, final)
        checkpoints = sorted((s, f) for s, f in saved_steps(self.run_dir).items() if f != self.run_dir)
        for _, old in checkpoints[:-self.keep]:
            shutil.rmtree(old)


def prepare_output_dir(args, inputs):
    """Check the output folder before any work, so a refused run changes nothing on disk."""
    if args.output_dir is None:
        return
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
    if args.resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not args.overwrite:
        raise UsageError(f"--output-dir {out} is not empty: pass --overwrite to replace it, "
                         f"or --resume {out}")
    if not (out / "run_config.json").is_file():  # never empty a folder train.py did not make (., ~, ...)
        raise UsageError(f"--output-dir {out} holds no earlier run (no run_config.json): --overwrite only "
                         f"replaces a run folder; pick an empty or new --output-dir")
    for path in inputs:  # --overwrite deletes the whole folder: it must not hold what this run reads
        if path and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"--output-dir {out} holds {path}, an input of this run: --overwrite would "
                             f"delete it; pick another --output-dir")


def make_output_dir(args):
    """The run folder, created only now. The default name is unique even for runs started in the same
    second: mkdir without exist_ok either creates the folder or fails, so two runs never share one."""
    if args.output_dir is not None:
        out = Path(args.output_dir)
        if args.overwrite and not args.resume:  # checked in prepare_output_dir: a run folder, no inputs
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = time.strftime("runs/%Y%m%d-%H%M%S")
    for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
        try:
            Path(stamp + suffix).mkdir(parents=True)
            args.output_dir = stamp + suffix
            return Path(args.output_dir)
        except FileExistsError:
            continue
    raise UsageError(f"cannot create a new folder {stamp}-N: pass --output-dir")
