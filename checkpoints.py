"""The run folder: saves, resuming, the metrics log and the curves. A run folder holds the final
save at its top (adapter or model, tokenizer, training_state.pt, run_config.json, metrics.jsonl,
curves.png) and the newest `--keep-checkpoints` `checkpoint-<step>/` of the same form (with
--stop-on-degeneration also `checkpoint-healthy/`): written whole or not at all, loaded without
running code, and resumed (from the highest step) only into their own run.

    python checkpoints.py runs/demo     # draws runs/demo/curves.png again from its metrics.jsonl
"""
import contextlib
import json
import math
import pickle
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import cli
import parallel
from cli import DEGENERATED, StopFlag, StopRequested, UsageError

# What the finished steps meant: a resume may not change these. The other settings (--max-steps,
# --epochs, the lr schedule, --eval-every, --report-to, ...) only change what comes next.
FIXED_BY_THE_RUN = ("model", "full", "load_in_4bit", "lora_r", "lora_alpha", "lora_target",
                    "chat_template", "dataset", "split", "eval_split", "eval_fraction",
                    "max_length", "max_prompt_length", "data_fingerprint", "beta", "gamma",
                    "sft_weight", "no_length_normalization", "batch_size", "seed", "world_size")


def resume_settings(run_dir, gamma_given):
    """The run's saved settings, and the defaults a resume parses its command line with."""
    config_file = Path(run_dir) / "run_config.json"
    if not config_file.is_file():
        raise UsageError(f"--resume {run_dir}: no run_config.json there")
    if not saved_steps(run_dir):
        raise UsageError(f"--resume {run_dir}: no checkpoint there (the run stopped before its "
                         f"first one): start it again with --overwrite")
    saved = json.loads(config_file.read_text())
    # Running a model's own code is never read from a file: a run folder could name any model.
    defaults = {k: v for k, v in saved.items() if k != "trust_remote_code"}
    # γ given again replaces the saved one; a saved ratio recomputes γ, in case β changes
    if gamma_given or saved.get("gamma_beta_ratio") is not None:
        defaults["gamma"] = None
    if gamma_given:
        defaults["gamma_beta_ratio"] = None
    return saved, defaults


def resume_conflicts(saved, current):
    """The settings of `current` that differ from the run's `saved` ones and may not change."""
    def same(key):
        a, b = saved.get(key), current.get(key)
        floats = float in (type(a), type(b)) and None not in (a, b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if floats else a == b
    described = {"data_fingerprint": "training pairs with fingerprint {} (the run's: {})",
                 "world_size": "{} processes where the run had {} (resume with as many)"}
    return [described.get(key, f"--{key.replace('_', '-')} {{}} (the run used {{}})").format(
            current.get(key), saved.get(key))
            for key in FIXED_BY_THE_RUN if key in current and key in saved and not same(key)]


def refuse_conflicts(args):
    """A resume that changes what the finished steps meant is refused, in one line."""
    conflicts = resume_conflicts(args.run_config, vars(args)) if args.resume else []
    if conflicts:
        raise UsageError(f"--resume {args.resume}: {'; '.join(conflicts)}: these change what the "
                         f"finished steps meant; start a new run instead")


def saved_steps(run_dir):
    """{step: folder} of the complete saves (checkpoint.json, written last, is there): the final one
    in `run_dir` and each checkpoint-<step>/."""
    numbered = [f for f in Path(run_dir).glob("checkpoint-*")
                if f.name.removeprefix("checkpoint-").isdecimal()]
    return {json.loads((f / "checkpoint.json").read_text())["step"]: f
            for f in [Path(run_dir), *numbered] if (f / "checkpoint.json").is_file()}


def training_state(model, optimizer, step):
    """Tensors and plain values to resume exactly. All processes call this: it holds each one's RNG
    state (dropout masks differ per process)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {"step": step, "optimizer": optimizer.state_dict(), "rng": parallel.objects(rng),
            "trainable": trainable}


def save_tokenizer(tokenizer, folder):
    """The tokenizer, chat template included, as it tokenizes now (train.py's saves, merge.py's)."""
    tokenizer.save_pretrained(folder)
    # transformers 5 does not save `legacy`; a SentencePiece tokenizer (Mistral, Llama-2) reloaded
    # without it puts "▁" after a special token, tokenizing differently from the model's own.
    if getattr(tokenizer, "legacy", None) is not None:
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) | {"legacy": tokenizer.legacy}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def write(model, tokenizer, folder, state):
    """Adapter (or model) in the usual format, tokenizer and training state, into `folder`."""
    model.save_pretrained(folder)
    # peft's model card is a template of "More Information Needed"
    (Path(folder) / "README.md").unlink(missing_ok=True)
    save_tokenizer(tokenizer, folder)
    torch.save(state, Path(folder) / "training_state.pt")
    (Path(folder) / "checkpoint.json").write_text(json.dumps({"step": state["step"]}))


def restore(model, optimizer, folder):
    """Load a `write` save, returning its step; a planted pickle in it is refused, never run."""
    try:
        state = torch.load(f"{folder}/training_state.pt", weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--resume: {folder}/training_state.pt cannot be loaded safely, refusing "
                         f"it: {reason[:200]}") from None
    # strict=False: frozen weights are not in the state
    if model.load_state_dict(state["trainable"], strict=False).unexpected_keys:
        raise UsageError(f"--resume {folder}: the checkpoint does not fit this model "
                         f"(other --lora-target or --full?)")
    optimizer.load_state_dict(state["optimizer"])
    # this process's own (a resume keeps the world size)
    rng = state["rng"][parallel.rank()]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    print(f"resuming from {folder} (step {state['step']})")
    return state["step"]


class Checkpointer(StopFlag):
    """Around the loop: saves every `save_every` steps or `save_minutes` minutes, and on SIGTERM or
    Ctrl-C, which only set a flag: the step finishes, a checkpoint is written, the run stops."""

    def __init__(self, model, tokenizer, optimizer, run_dir, save_every, save_minutes, keep,
                 stop_after=0):
        super().__init__("finishing this step, then saving a checkpoint")
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.run_dir = Path(run_dir)
        self.save_every = save_every
        self.save_seconds = 60 * save_minutes
        self.keep = keep
        self.last_save = time.monotonic()
        # a finished run resumed: its final save is the only copy of its step (read before any
        # process writes, so all take the same decision in save_final)
        self.final_save_exists = (self.run_dir / "checkpoint.json").is_file()
        # --stop-on-degeneration: after this many flagged sampling rounds in a row (0: never)
        self.stop_after = stop_after
        self.flagged_rounds = 0
        healthy = self.run_dir / "checkpoint-healthy" / "checkpoint.json"
        self.healthy_step = json.loads(healthy.read_text())["step"] if healthy.is_file() else None
        # what a crash while saving left behind
        for leftover in self.run_dir.glob(".tmp-checkpoint-*") if parallel.rank() == 0 else []:
            shutil.rmtree(leftover)

    def after_step(self, step, last_step, degeneration=None):
        """After each optimizer step (1-based), in every process; StopRequested after a signal.
        `degeneration`: after a sampling round, its verdict ("" healthy, else generation's line;
        processes that did not sample pass ""), None without a round."""
        clock = self.save_seconds and time.monotonic() - self.last_save >= self.save_seconds
        due = bool((self.save_every and step % self.save_every == 0) or clock)
        # All act on the first process to see the clock, a signal or a degenerate sample. A signal
        # that lands after the flags were read stays set for the next step: never lost.
        due, signum, flagged = parallel.agree(int(due), self.signal or 0, int(bool(degeneration)))
        self.signal = signum or self.signal
        if self.stop_after and degeneration is not None:
            self.after_round(step, flagged, degeneration)
        # the final save comes next anyway
        if step == last_step or not (due or signum):
            return
        self.save(step)
        if signum:
            world = parallel.world_size()
            launch = f" --nproc-per-node {world}" if world > 1 else ""
            raise StopRequested(f"{signal.Signals(signum).name} after step {step}: checkpoint "
                                f"saved; resume with: python train.py{launch} --resume "
                                f"{self.run_dir}",
                                128 + signum)

    def start_healthy(self, step):
        """--stop-on-degeneration: the state training starts from is the first healthy one, unless
        the run folder keeps one from before (a resume after a signal or a crash)."""
        if self.stop_after and (self.healthy_step is None or self.healthy_step > step):
            self.save(step, "checkpoint-healthy")
            self.healthy_step = step

    def after_round(self, step, flagged, line):
        """A healthy round's state replaces checkpoint-healthy/, kept apart from the periodic
        checkpoints; after `stop_after` flagged rounds in a row that state becomes the final save
        and the run stops (exit 4). Later checkpoints hold collapsed states: they go, so that
        --resume continues from the healthy one."""
        if not flagged:
            self.flagged_rounds = 0
            self.save(step, "checkpoint-healthy")
            self.healthy_step = step
            return
        self.flagged_rounds += 1
        if self.flagged_rounds < self.stop_after:
            return
        if parallel.rank() == 0:
            for later, folder in saved_steps(self.run_dir).items():
                if later > self.healthy_step and folder != self.run_dir:
                    shutil.rmtree(folder)
            # as save_final: the marker goes first and comes last
            healthy = self.run_dir / "checkpoint-healthy"
            (self.run_dir / "checkpoint.json").unlink(missing_ok=True)
            for file in sorted(healthy.iterdir(), key=lambda f: f.name == "checkpoint.json"):
                shutil.copy2(file, self.run_dir / file.name)
            shutil.rmtree(healthy)
            plot_curves(self.run_dir)
        parallel.barrier()
        raise StopRequested(
            f"{line.replace('warning: ', '', 1)} ({self.flagged_rounds} sampling rounds in a "
            f"row); the run folder's model is step {self.healthy_step}'s, the last whose samples "
            f"were healthy: python train.py --resume {self.run_dir} continues from it (lower --lr "
            f"first)", DEGENERATED)

    def save_final(self, step):
        """Into the run folder itself, where eval.py and PeftModel look; its marker goes first, so
        --resume never trusts a save a crash cut short. Over an earlier final save (a finished run
        resumed) a checkpoint comes first: a crash then still leaves this step to resume from.
        Called in every process (RNG states)."""
        if self.final_save_exists:
            # one more than `keep`: this copy goes once the final save is whole
            self.save(step, keep=self.keep + 1)
        state = training_state(self.model, self.optimizer, step)
        if parallel.rank() == 0:
            (self.run_dir / "checkpoint.json").unlink(missing_ok=True)
            write(self.model, self.tokenizer, self.run_dir, state)
            if self.final_save_exists:
                shutil.rmtree(self.run_dir / f"checkpoint-{step}")
            # --stop-on-degeneration's fallback: a finished run needs none
            shutil.rmtree(self.run_dir / "checkpoint-healthy", ignore_errors=True)

    def save(self, step, name=None, keep=None):
        """checkpoint-<step>/ (or `name`) via a temporary folder renamed into place, so a crash
        leaves the older ones intact; the newest `keep` (default: the run's) periodic ones stay.
        Called in every process (RNG states); one writes."""
        state = training_state(self.model, self.optimizer, step)
        # the clock restarts when a checkpoint --resume can take starts
        if name is None:
            self.last_save = time.monotonic()
        if parallel.rank() != 0:
            return
        final = self.run_dir / (name or f"checkpoint-{step}")
        temporary = self.run_dir / f".tmp-{final.name}"
        write(self.model, self.tokenizer, temporary, state)
        # the same step saved again after a resume
        shutil.rmtree(final, ignore_errors=True)
        temporary.replace(final)
        saves = sorted((s, f) for s, f in saved_steps(self.run_dir).items() if f != self.run_dir)
        for _, old in saves[:-(keep or self.keep)]:
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
    # never empty a folder train.py did not make (., ~, ...)
    if not (out / "run_config.json").is_file():
        raise UsageError(f"--output-dir {out} holds no earlier run (no run_config.json): "
                         f"--overwrite only replaces a run folder; pick an empty or new one")
    # --overwrite deletes the whole folder: it must not hold what this run reads
    for path in inputs:
        if path and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"--output-dir {out} holds {path}, an input of this run: --overwrite "
                             f"would delete it; pick another --output-dir")


def make_output_dir(args):
    """The run folder, made only now; mkdir without exist_ok makes one or fails, so two runs
    started in the same second never share a default one."""
    if args.output_dir is not None:
        out = Path(args.output_dir)
        # prepare_output_dir checked it: a run folder holding no input
        if args.overwrite and not args.resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = time.strftime("runs/%Y%m%d-%H%M%S")
    for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
        with contextlib.suppress(FileExistsError):
            Path(stamp + suffix).mkdir(parents=True)
            return Path(stamp + suffix)
    raise UsageError(f"cannot create a new folder {stamp}-N: pass --output-dir")


def finished_already(args, start, total_steps):
    """A resume of a run whose final save is there already changes nothing."""
    if start >= total_steps and args.resume and args.resume_from == Path(args.output_dir):
        print(f"{args.output_dir} finished all {total_steps} steps already")
        return True
    if start > total_steps:
        raise UsageError(f"--resume {args.resume}: its newest checkpoint is at step {start}, past "
                         f"the {total_steps} steps asked for")
    return False


def open_run_folder(args, start, main_process):
    """The run folder, its run_config.json and the metrics log (one writer: the first process)."""
    out = Path(parallel.objects(str(make_output_dir(args)) if main_process else None)[0])
    args.output_dir = str(out)
    if args.resume:
        changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k in args.run_config and args.run_config[k] != v
                   and k not in ("output_dir", "demo")]
        print("continuing with " + (", ".join(changed) or "the run's settings"))
    config = {k: v for k, v in vars(args).items()
              if k not in ("resume", "overwrite", "run_config", "resume_from")}
    if main_process:
        (out / "run_config.json").write_text(json.dumps(config, indent=2))
    return out, Logger(out, args.report_to, config, start, active=main_process)


@contextlib.contextmanager
def out_of_memory_stops(pairs, args):
    """CUDA out of memory in a step: one line with what helps, the last checkpoint intact."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        memory = ""
        if torch.cuda.is_available():
            memory = (f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
                      f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved; ")
        longest = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs)
        raise StopRequested(
            f"out of memory ({memory}longest sequence {longest} tokens, --micro-batch-size "
            f"{args.micro_batch_size}): lower it or --max-length, or turn on --load-in-4bit and "
            f"--gradient-checkpointing; the last checkpoint is intact", 1) from None


def json_step(line):
    """The step of a metrics.jsonl line; infinity (never kept) for a line a crash cut short."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


class Logger:
    """metrics.jsonl, plus tensorboard or wandb when asked for; silent in all processes but the
    first. A resume drops what a crash left past the checkpoint, and a line it tore in half."""

    def __init__(self, out, report_to, config, start_step, active=True):
        self.path = out / "metrics.jsonl"
        self.active = active
        self.writer = None
        self.wandb = None
        if not active:
            return
        old = self.path.read_text().splitlines() if self.path.exists() else []
        self.path.write_text("".join(f"{line}\n" for line in old if json_step(line) <= start_step))
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(project="simpo", config=config, dir=str(out))

    def log(self, step, metrics):
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            # numbers only: a skipped step says why in words
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            # its thread writes every 120 s: a run that ends or is killed would lose its last steps
            self.writer.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)


def smooth(values, weight=0.8):
    """An exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    average, smoothed = 0.0, []
    for n, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** n))
    return smoothed


def plot_curves(out):
    """curves.png: the training curves raw and smoothed, held-out points, and generation health."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss", "rewards/accuracies", "rewards/margins"]
    keys += [k for k in ("health/policy/rep4", "health/policy/ended") if any(k in r for r in rows)]
    fig = Figure(figsize=(4.4 * len(keys), 3.5), layout="tight")
    for ax, key in zip(fig.subplots(1, len(keys)), keys, strict=True):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        if key.startswith("health"):
            ax.plot(steps, values, "o-", label="policy samples")
        elif values:
            ax.plot(steps, values, "-", alpha=0.3, label="train")
            ax.plot(steps, smooth(values), "-", color="C0", label="train, smoothed")
        points = [(r["step"], r["eval/" + key]) for r in rows if "eval/" + key in r]
        if points:
            ax.plot(*zip(*points, strict=True), "o--", label="held-out")
        ax.set(title=key, xlabel="step")
        ax.legend()
    fig.savefig(out / "curves.png", dpi=100)


def main(argv=None):
    p = cli.Parser(description="Draw RUN/curves.png again from RUN/metrics.jsonl.")
    p.add_argument("run", help="a run folder")
    try:
        run = Path(p.parse_args(argv).run)
        if not (run / "metrics.jsonl").is_file():
            raise cli.UsageError(f"{run}: no metrics.jsonl (not a run folder)")
    except cli.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plot_curves(run)
    print(f"wrote {run / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
