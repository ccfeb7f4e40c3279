"""Train a chat model with SimPO (LoRA or 4-bit QLoRA, a plain PyTorch loop).

    python train.py        # offline demo: a tiny model learns a toy preference in a minute on 2 CPU cores
    python train.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --dataset princeton-nlp/llama3-ultrafeedback-armorm --eval-split test \
        --beta 10 --gamma-beta-ratio 0.3 --lr 5e-6
    torchrun --nproc-per-node 8 train.py --model ... --dataset ...     # one process per GPU (parallel.py)
    python train.py --resume runs/<name>                               # after Ctrl-C, SIGTERM or a crash

One optimizer step: `--batch-size` preference pairs, fed `--micro-batch-size` pairs per forward pass. Each
forward runs each pair's prompt once with its chosen and rejected responses, packed without padding
(modeling.build_batch; padded rows for models whose attention cannot take that), and scores only the
response tokens from the final hidden states, never building full logits. Checkpoints, signals and
resuming live in checkpoints.py.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import data
import modeling
import parallel
import simpo
from modeling import UsageError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=modeling.HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model",
                   help="SFT model: local folder or hub id (omit with --dataset for the offline demo)")
    g.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA: nf4 weights, double quantisation, bf16 compute "
                        "(default: on with CUDA, off on CPU)")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (small models)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32,
                   help="LoRA scale numerator: updates are scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora-target", default="all-linear", help="comma-separated module names, or all-linear")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward: much less memory, ~30%% slower "
                        "(default: on with CUDA)")
    g.add_argument("--chat-template",
                   help="a Jinja chat template for tokenizers without one: text, or a file (the run keeps "
                        "its text)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a hub model ships with (only for a model you trust)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset",
                   help=".jsonl/.json/.parquet/.csv file, folder or hub id (see data.py for layouts)")
    g.add_argument("--split", default="train", help="training split")
    g.add_argument("--eval-split", help="held-out split of the same dataset, e.g. test_prefs")
    g.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of --split instead")
    g.add_argument("--max-length", type=int, default=2048, help="prompt + response tokens")
    g.add_argument("--max-prompt-length", type=int, default=1800, help="longer prompts lose their start")
    g = p.add_argument_group("SimPO objective")
    g.add_argument("--beta", type=float, default=2.0, help="reward scale β (the official repo's default)")
    g.add_argument("--gamma", type=float, help="target reward margin γ (default: 0.5)")
    g.add_argument("--gamma-beta-ratio", type=float,
                   help="γ/β, as the published configs give it (instead of --gamma)")
    g.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this (>= 0) × the chosen responses' NLL (average per token)")
    g.add_argument("--no-length-normalization", action="store_true",
                   help="reward from the summed log-prob (ablation)")
    g = p.add_argument_group("optimisation")
    # LoRA trains ~0.5% of the weights from zero, so it wants a larger rate than the published full
    # fine-tuning rates (3e-7 to 1e-6); 5e-6 to 2e-5 is the usual range for LoRA preference tuning.
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (> 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="linear warm-up over this fraction of the steps (rounded down), its last step at "
                        "the peak; then cosine decay to 0")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32, help="pairs per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=2,
                   help="pairs per forward pass; accumulation is derived")
    g.add_argument("--seed", type=int, default=42, help="data order, LoRA init, --eval-fraction split")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="default runs/<timestamp>")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    g.add_argument("--save-every-minutes", type=float, default=30.0,
                   help="checkpoint every this many minutes of wall-clock time (0: off)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep only the newest N checkpoint-<step> folders (the final save is kept too)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out evaluation every N steps (always at start and end)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --output-dir (a folder with a run_config.json)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is not finite instead of stopping the run; "
                        "its pairs are then not learned from and the schedule moves on without them")
    g.add_argument("--report-to", choices=["tensorboard", "wandb"],
                   help="also log there (needs that package)")
    args = p.parse_args(argv)
    if args.resume:  # the saved run's settings, overridden by whatever is on this command line
        config_file = Path(args.resume) / "run_config.json"
        if not config_file.is_file():
            raise UsageError(f"--resume {args.resume}: no run_config.json there")
        if not checkpoints.saved_steps(args.resume):
            raise UsageError(f"--resume {args.resume}: no checkpoint there (the run stopped before its "
                             f"first one): start it again with --overwrite")
        saved = json.loads(config_file.read_text())
        # `saved` stays as the run wrote it: resume_conflicts compares with it. Running a model's own code is
        # never read from a file: a run folder from elsewhere could name any model.
        defaults = {k: v for k, v in saved.items() if k != "trust_remote_code"}
        if args.gamma is not None or args.gamma_beta_ratio is not None:  # γ given again replaces the saved
            defaults.update(gamma=None, gamma_beta_ratio=None)
        elif saved.get("gamma_beta_ratio") is not None:  # recompute γ from the ratio, in case β changes
            defaults["gamma"] = None
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        args.output_dir, args.overwrite, args.run_config = args.resume, False, saved
        if saved.get("trust_remote_code") and not args.trust_remote_code:
            raise UsageError(f"--resume {args.resume}: the run's model ships its own Python code: pass "
                             f"--trust-remote-code again if you trust it (it is never read from the run)")
    elif args.model is None and args.dataset is None:  # the offline demo
        import demo
        p.set_defaults(**demo.TRAINING, demo=True)
        args = p.parse_args(argv)
    return check_args(args)


def check_args(args):
    for name, value in vars(args).items():  # a NaN passes every `<` check below, and turns the weights to NaN
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
    if args.lr <= 0 or args.sft_weight < 0:  # AdamW would refuse a negative lr only after the model loads
        raise UsageError(f"--lr must be > 0 and --sft-weight >= 0 (got {args.lr:g} and {args.sft_weight:g})")
    modeling.require_positive(args, "batch_size", "micro_batch_size", "epochs", "max_steps", "lora_r",
                              "lora_alpha", "keep_checkpoints")
    if args.max_grad_norm <= 0 or min(args.save_every, args.save_every_minutes, args.eval_every) < 0:
        raise UsageError("--max-grad-norm must be > 0, --save-every, --save-every-minutes and "
                         "--eval-every >= 0")
    if not 0 <= args.warmup_ratio < 1 or not 0 <= args.lora_dropout < 1:
        raise UsageError("--warmup-ratio and --lora-dropout must be in [0, 1)")
    if (args.model is None) != (args.dataset is None) and not getattr(args, "demo", False):
        raise UsageError("pass both --model and --dataset, or neither for the offline demo")
    if args.gamma is not None and args.gamma_beta_ratio is not None and \
            not math.isclose(args.gamma, args.gamma_beta_ratio * args.beta):
        raise UsageError("--gamma and --gamma-beta-ratio are two ways of setting γ: pass one")
    if args.gamma is None:
        args.gamma = 0.5 if args.gamma_beta_ratio is None else args.gamma_beta_ratio * args.beta
    if args.micro_batch_size > args.batch_size:
        raise UsageError("--micro-batch-size cannot exceed --batch-size")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if args.batch_size % processes:
        raise UsageError(f"--batch-size {args.batch_size} pairs per step cannot be split evenly over "
                         f"{processes} processes: make it a multiple of {processes}")
    if args.report_to and importlib.util.find_spec(args.report_to) is None:
        raise UsageError(f"--report-to {args.report_to} needs that package: pip install {args.report_to}")
    if args.eval_split and args.eval_fraction:
        raise UsageError("pass --eval-split or --eval-fraction, not both")
    if not 0 <= args.eval_fraction < 1:
        raise UsageError("--eval-fraction must be in [0, 1)")
    modeling.check_beta_gamma(args.beta, args.gamma)
    if args.full and args.load_in_4bit:
        raise UsageError("--full trains every weight: it cannot load them in 4-bit (drop --load-in-4bit)")
    cuda = torch.cuda.is_available()
    if args.load_in_4bit is None:  # QLoRA by default on a GPU, never with --full
        args.load_in_4bit = cuda and not args.full
    if args.gradient_checkpointing is None:  # on by default on a GPU, where memory is what runs out
        args.gradient_checkpointing = cuda
    for name in ("model", "dataset"):  # run_config.json must still find local paths from another folder
        if getattr(args, name) and Path(getattr(args, name)).exists():
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    args.chat_template = modeling.read_chat_template(args.chat_template)  # the run keeps the text, no file
    if args.lora_target != "all-linear":  # "q_proj, v_proj" and "q_proj,v_proj" are the same LoRA
        args.lora_target = ",".join(name.strip() for name in args.lora_target.split(",") if name.strip())
    if args.resume:
        conflicts = checkpoints.resume_conflicts(args.run_config, vars(args))
        if conflicts:
            raise UsageError(f"--resume {args.resume}: {'; '.join(conflicts)}: these change what the "
                             f"finished steps meant; start a new run instead")
    return args


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Learning rate of optimizer step `step` (0-based): `warmup_steps` steps rise linearly to the peak, the
    last of them at it (with no warm-up the first step is at the peak, so a 1-step run trains at the peak);
    the steps after the peak follow a cosine towards 0."""
    if step < warmup_steps:  # warm-up, step k at (k + 1)/warmup_steps of the peak: early rewards are noisy
        return peak_lr * (step + 1) / warmup_steps
    peak_step = max(warmup_steps - 1, 0)
    progress = (step - peak_step) / (total_steps - peak_step)  # 0 at the peak, 1 one step past the end
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))  # cosine decay towards 0


def evaluate(model, examples, args, pad_id, packed):
    """Held-out metrics; with several processes each scores a slice and the slices are gathered."""
    model.eval()  # no dropout
    mine = [examples[i] for i in parallel.share(range(len(examples)))]
    logps = torch.zeros(2, 0)
    if mine:
        logps = torch.stack(modeling.pair_logps(model, mine, pad_id, args.micro_batch_size,
                                                not args.no_length_normalization, "evaluating", packed))
    device = next(model.parameters()).device
    metrics = modeling.reward_metrics(*parallel.gather(logps.to(device)).cpu(), args.beta, args.gamma)
    model.train()
    return {f"eval/{k}": v for k, v in metrics.items()}


def json_step(line):
    """The step of a metrics.jsonl line, or None for a line that a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class Logger:
    """metrics.jsonl, plus tensorboard or wandb when asked for; silent in all processes but the first."""

    def __init__(self, out, report_to, config, start_step, active=True):
        self.path, self.active, self.writer, self.wandb = out / "metrics.jsonl", active, None, None
        if not active:
            return
        old = self.path.read_text().splitlines() if self.path.exists() else []
        # drop what a crash left past the checkpoint, and a line it tore in half
        kept = [line for line in old if json_step(line) is not None and json_step(line) <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
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
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            # its thread writes every 120 s: a run that ends or is killed would lose its last steps
            self.writer.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)


def plot_curves(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ["loss", "rewards/accuracies", "rewards/margins"], strict=True):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label="held-out" if prefix else "train")
        ax.set(title=key, xlabel="step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


class PairScorer(torch.nn.Module):
    """modeling.policy_logps as a module (DistributedDataParallel wraps the call whose backward it syncs),
    with the batch layout modeling.choose_layout chose: each prompt once and no padding, or padded."""

    def __init__(self, model, max_length, packed):
        super().__init__()
        self.model, self.max_length, self.packed = model, max_length, packed

    def batch(self, pairs, pad_id):
        return modeling.build_batch(pairs, pad_id, self.packed, self.max_length)

    def forward(self, batch, average=True):
        return modeling.policy_logps(self.model, batch, average)


def accumulate_gradients(scorer, pairs, args, pad_id, weight=None):
    """Forward and backward over one optimizer step's pairs, `--micro-batch-size` at a time; each pair's
    loss counts `weight` times (default 1/len(pairs): the step's loss is the mean over its pairs).
    Returns the detached per-pair (SimPO losses, SFT losses, chosen logps, rejected logps, chosen rewards,
    rejected rewards) as one (6, pairs) tensor and the step's token count (prompt + response of both
    sequences, no padding), both left on the device."""
    device, average, logs, tokens = next(scorer.parameters()).device, not args.no_length_normalization, [], 0
    weight = 1 / len(pairs) if weight is None else weight
    for i in range(0, len(pairs), args.micro_batch_size):
        batch = getattr(scorer, "module", scorer).batch(pairs[i:i + args.micro_batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        # Several processes all-reduce their gradients once per step, in the last micro-batch's backward.
        last = i + args.micro_batch_size >= len(pairs)
        with contextlib.nullcontext() if last or not hasattr(scorer, "no_sync") else scorer.no_sync():
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                chosen_logps, rejected_logps = scorer(batch, average).chunk(2)
            losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(chosen_logps, rejected_logps,
                                                                        args.beta, args.gamma)
            n_chosen = batch["response_tokens"][: len(chosen_logps)].clamp(min=1)
            sft_losses = -(chosen_logps if average else chosen_logps / n_chosen)  # NLL per chosen token
            # Summed, times 1/(pairs in the whole step): the update is the mean over the step's pairs
            # however they are split, so 1×8 and 4×2 (and 2 processes × 4) give the same update.
            ((losses + args.sft_weight * sft_losses).sum() * weight).backward()
        logs.append(torch.stack([losses.detach(), sft_losses.detach(), chosen_logps.detach(),
                                 rejected_logps.detach(), chosen_rewards, rejected_rewards]))
        tokens += batch["sequence_tokens"].sum()
    return torch.cat(logs, dim=1), tokens


def out_of_memory(pairs, args):
    memory = ""
    if torch.cuda.is_available():
        memory = (f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
                  f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved; ")
    longest = max((len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs), default=0)
    return checkpoints.StopRequested(
        f"out of memory ({memory}longest sequence {longest} tokens, --micro-batch-size "
        f"{args.micro_batch_size}): lower --micro-batch-size or --max-length, or turn on --load-in-4bit "
        f"and --gradient-checkpointing; the last checkpoint is intact", 1)


def load_pairs(args, tokenizer, main_process):
    """The training and held-out pairs, tokenized (under torchrun by the first process; the others then read
    its cache). A resume must find the very pairs its run trained on."""
    if not main_process:
        parallel.barrier()
    train_set, eval_set, summary = data.load_examples(tokenizer, args.dataset, args.split, args.eval_split,
                                                      args.eval_fraction, args.seed, args.max_length,
                                                      args.max_prompt_length)
    if main_process:
        parallel.barrier()
    print(summary)  # pairs kept and left out (and why), token lengths, where the tokenized data is cached
    if not train_set:
        raise data.DataError(f"{args.dataset}: no training pairs left after holding out and truncation")
    args.data_fingerprint = train_set.fingerprint()
    conflicts = checkpoints.resume_conflicts(args.run_config, vars(args)) if args.resume else []
    if conflicts:
        raise UsageError(f"--resume {args.resume}: {'; '.join(conflicts)}: the run trained on other "
                         f"pairs or in another setting; start a new run instead")
    return train_set, eval_set


def train(args):
    rank, args.world_size, device = parallel.setup()
    main_process = rank == 0
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 is slow on CPUs
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if getattr(args, "demo", False):  # built next to the run, not in it: eval.py loads it as the base model
        import demo
        if main_process:
            demo.build_tiny_model(Path(args.output_dir).parent / "demo-model")
        parallel.barrier()
        args.model = str((Path(args.output_dir).parent / "demo-model").resolve())
    checkpoints.prepare_output_dir(args, [args.model, args.dataset])
    parallel.barrier()  # every process has checked the folder before the first one writes to it
    tokenizer = modeling.load_tokenizer(args.model, args.chat_template, args.trust_remote_code)
    if not args.resume:  # the run keeps the template it trains with, for eval.py and --resume
        args.chat_template = tokenizer.chat_template
    train_set, eval_set = load_pairs(args, tokenizer, main_process)
    model = modeling.prepare_model(args, device, dtype)
    packed, layout = modeling.choose_layout(model, args.max_length)
    print(layout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start, folder = 0, None
    if args.resume:
        folder = max(checkpoints.saved_steps(args.resume).items())[1]  # the highest step
        start = checkpoints.restore(model, optimizer, folder)
        print(f"resuming from {folder} (step {start})")
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    # rounded down, with slack for float error (0.29 × 100 is 28.999…): a 1-step run has no warm-up
    warmup_steps = int(args.warmup_ratio * total_steps + 1e-9)
    if start >= total_steps and folder == Path(args.output_dir):  # the final save is there already
        print(f"{args.output_dir} finished all {total_steps} steps already")  # and the folder stays as it is
        return Path(args.output_dir)
    if start > total_steps:
        raise UsageError(f"--resume {args.resume}: its newest checkpoint is at step {start}, past the "
                         f"{total_steps} steps asked for")
    out = Path(parallel.from_rank_0(str(checkpoints.make_output_dir(args)) if main_process else None))
    args.output_dir = str(out)
    if args.resume:
        changed = {k: v for k, v in vars(args).items()
                   if k in args.run_config and args.run_config[k] != v and k != "output_dir"}
        print("continuing with " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
              if changed else "continuing with the run's settings")
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "run_config")}
    if main_process:  # one writer for everything in the run folder
        (out / "run_config.json").write_text(json.dumps(config, indent=2))
    logger = Logger(out, args.report_to, config, start, active=main_process)
    pad_id = tokenizer.pad_token_id
    if eval_set and start == 0:
        before = evaluate(model, eval_set, args, pad_id, packed)
        logger.log(0, before)
        print(f"held-out reward accuracy before training: {before['eval/rewards/accuracies']:.3f}")

    scorer = PairScorer(model, args.max_length, packed)
    if args.world_size > 1:  # the trainable weights' gradients are all-reduced in the last backward
        scorer = torch.nn.parallel.DistributedDataParallel(
            scorer, device_ids=[torch.device(device).index] if device != "cpu" else None)
    saver = checkpoints.Checkpointer(model, tokenizer, optimizer, out, args.save_every,
                                     args.save_every_minutes, args.keep_checkpoints)
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="training",
               disable=not main_process)
    with saver:
        for step in bar:
            # the order follows from (seed, epoch): resuming needs only `step`
            epoch, index = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
            indices = order[index * args.batch_size:(index + 1) * args.batch_size].tolist()
            pairs = [train_set[i] for i in indices]
            # This process's slice of the step. The update is the mean over all the step's pairs: each
            # process weighs its pairs by world/pairs, DDP averages over the world. A process whose slice
            # of a short last step is empty still joins the all-reduce, with a pair that weighs nothing.
            mine = parallel.share(pairs)
            weight = args.world_size / len(pairs) if mine else 0.0
            lr = lr_at(step, total_steps, warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.time()
            try:
                stats, tokens = accumulate_gradients(scorer, mine or pairs[:1], args, pad_id, weight)
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(mine or pairs[:1], args) from None
            tokens = tokens * bool(mine)  # a stand-in pair's tokens do not count
            stats = parallel.gather(stats[:, :len(mine)])  # (6, pairs of the whole step), in step order
            losses, sft_losses, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = stats
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            # Read from the device once per step, not per micro-batch: each read waits for the GPU to catch
            # up. It comes before optimizer.step(), so that a non-finite step never reaches the weights.
            loss, sft_loss, grad_norm, tokens = torch.stack([
                losses.mean(), sft_losses.mean(), grad_norm.float(), parallel.total(tokens.float())]).tolist()
            if not all(map(math.isfinite, (loss, sft_loss, grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                where = f"step {step + 1}: non-finite loss {loss} or gradient norm {grad_norm} " \
                        f"(training pairs {indices}, 0-based, in --split order after holding out)"
                if not args.skip_nonfinite:
                    raise checkpoints.StopRequested(f"{where}; the weights were not updated, the last "
                                                    f"checkpoint is intact (or pass --skip-nonfinite)", 3)
                tqdm.write(f"skipped {where}")
                logger.log(step + 1, {"skipped": "non-finite", "lr": lr})
                saver.after_step(step + 1, total_steps)
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            metrics = simpo.preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
            metrics.update(loss=loss, grad_norm=grad_norm, lr=lr,
                           tokens_per_s=tokens / (time.time() - started))
            if args.sft_weight:
                metrics["sft_loss"] = sft_loss
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps and eval_set:
                metrics.update(evaluate(model, eval_set, args, pad_id, packed))
            logger.log(step + 1, metrics)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            saver.after_step(step + 1, total_steps)  # every N steps or minutes, and on SIGTERM / Ctrl-C

    final_state = checkpoints.training_state(model, optimizer, total_steps)  # every process's RNG
    if main_process:  # the final save first: a signal in the final evaluation below loses nothing
        checkpoints.save_final(model, tokenizer, out, final_state)
    print(f"saved to {out}")
    if saver.signal:  # it came during the last step
        raise checkpoints.StopRequested(f"{signal.Signals(saver.signal).name} during the last step: the "
                                        f"final save is complete, the final evaluation skipped "
                                        f"(python eval.py --adapter {out} gives it)", 128 + saver.signal)
    if eval_set:
        after = evaluate(model, eval_set, args, pad_id, packed)
        logger.log(total_steps, after)
        print(f"held-out reward accuracy after training: {after['eval/rewards/accuracies']:.3f} "
              f"(margin {after['eval/rewards/margins']:.2f}, loss {after['eval/loss']:.3f})")
    if main_process:
        plot_curves(out)
    return out


def say(line):
    """One write per message: processes under torchrun share stderr, and their lines must not interleave."""
    sys.stderr.write(f"\n{line}\n")


def main(argv=None):
    try:
        train(parse_args(argv))
    except (data.DataError, UsageError) as error:
        say(f"error: {error}")
        return 2
    except checkpoints.StopRequested as stop:
        if stop.exit_code <= 128 or parallel.rank() == 0:  # a signal stops every process alike: say it once
            say(f"{'stopped' if stop.exit_code > 128 else 'error'}: {stop}")
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (loading, or the final evaluation)
        say("interrupted: the run folder keeps its last complete save")
        return 130
    finally:
        parallel.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
