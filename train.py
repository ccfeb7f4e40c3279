"""Train a chat model with SimPO (LoRA or 4-bit QLoRA, a plain PyTorch loop).

    python train.py        # offline demo: a tiny model learns a toy preference in a minute on a CPU
    python train.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --dataset princeton-nlp/llama3-ultrafeedback-armorm --eval-split test \
        --beta 10 --gamma-beta-ratio 0.3 --lr 5e-6
    python train.py --nproc-per-node 8 --model ... --dataset ...    # one process per GPU
    python train.py --resume runs/<name>              # after Ctrl-C, SIGTERM or a crash

Supports: LoRA on every linear layer (or --lora-target), 4-bit QLoRA (default on CUDA), full
fine-tuning of small models (--full), gradient accumulation, data parallelism under torchrun,
checkpoints and exact resuming, an SFT term (--sft-weight), the no-length-normalisation ablation.
Assumes: one optimizer step is --batch-size pairs, fed --micro-batch-size pairs per forward; the
model fits on each GPU (no FSDP); pairs longer than --max-length tokens are truncated.

Read `train_step` first: it is the SimPO step. `train` is the loop around it, one call per concern.
Batches are laid out by packing.py, the model is loaded and checked by modeling.py, the run folder
(checkpoints, resuming, the metrics log) is checkpoints.py, and torchrun is parallel.py.
"""
import argparse
import importlib.util
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import cli
import generation
import modeling
import packing
import parallel
import preferences
import simpo
from cli import StopRequested, UsageError


def train_step(scorer, pairs, args, pad_id, layout, weight=None):
    """Forward and backward over one optimizer step's pairs, --micro-batch-size at a time; each
    pair's loss counts `weight` times (default 1/len(pairs): the mean). Returns the per-pair SimPO
    losses, SFT losses, chosen and rejected logps and rewards as one (6, pairs) tensor, and the
    step's tokens (no padding), both left on the device."""
    device = next(scorer.parameters()).device
    average = not args.no_length_normalization
    weight = 1 / len(pairs) if weight is None else weight
    logs = []
    tokens = 0
    for i in range(0, len(pairs), args.micro_batch_size):
        batch = packing.build_batch(pairs[i:i + args.micro_batch_size], pad_id, layout)
        batch = {k: v.to(device) for k, v in batch.items()}
        # under torchrun, gradients are all-reduced once per step, in the last backward
        scorer.require_backward_grad_sync = i + args.micro_batch_size >= len(pairs)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            # one forward for both sides: the batch is [chosen..., rejected...]
            chosen_logps, rejected_logps = scorer(batch, average).chunk(2)
        # r = β/|y| · log π(y|x);  L = −log σ(r_chosen − r_rejected − γ)
        losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(chosen_logps, rejected_logps,
                                                                    args.beta, args.gamma)
        # the chosen responses' NLL per token, for --sft-weight
        n_chosen = batch["response_tokens"][:len(chosen_logps)].clamp(min=1)
        sft_losses = -(chosen_logps if average else chosen_logps / n_chosen)
        # Summed, times 1/(pairs in the whole step): the update is the mean over the step's pairs
        # however they are split, so 1×8 and 4×2 (and 2 processes × 4) give the same update.
        ((losses + args.sft_weight * sft_losses).sum() * weight).backward()
        logs.append(torch.stack([losses, sft_losses, chosen_logps, rejected_logps, chosen_rewards,
                                 rejected_rewards]).detach())
        tokens += batch["sequence_tokens"].sum()
    return torch.cat(logs, dim=1), tokens


def train(args):
    rank, args.world_size, device = parallel.setup()
    main_process = rank == 0
    tokenizer, train_set, eval_set = prepare_data(args, main_process)
    # bf16 compute on GPUs; bf16 is slow on CPUs
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = modeling.prepare_model(args, device, dtype)
    # the longest pair as truncated (at most --max-length): what rows and the check are built for
    layout, line = modeling.choose_layout(model, preferences.longest(train_set, eval_set))
    print(line)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = checkpoints.restore(model, optimizer, args.resume_from) if args.resume else 0
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    # rounded down, with slack for float error (0.29 × 100 is 28.99…): a 1-step run has no warm-up
    warmup_steps = int(args.warmup_ratio * total_steps + 1e-9)
    if checkpoints.finished_already(args, start, total_steps):
        return Path(args.output_dir)
    out, logger = checkpoints.open_run_folder(args, start, main_process)
    scorer = PairScorer(model)
    if args.world_size > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(
            scorer, device_ids=[torch.device(device).index] if device != "cpu" else None)
    saver = checkpoints.Checkpointer(model, tokenizer, optimizer, out, args.save_every,
                                     args.save_every_minutes, args.keep_checkpoints,
                                     generation.STOP_AFTER if args.stop_on_degeneration else 0)
    pad_id = tokenizer.pad_token_id
    monitor = None
    if args.sample_every and main_process:
        monitor = generation.SampleMonitor(model, tokenizer, eval_set, args.sample_prompts,
                                           args.sample_max_new_tokens, args.seed, out / "samples")
    if eval_set and start == 0:
        before = evaluate(model, eval_set, args, pad_id, layout)
        logger.log(0, before | (monitor.base() if monitor else {}))
        print(f"held-out reward accuracy before training: {before['eval/rewards/accuracies']:.3f}")
    saver.start_healthy(start)  # --stop-on-degeneration's fallback
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="training",
               disable=not main_process)
    with saver:
        for step in bar:
            pairs, weight, indices = pairs_of_step(train_set, step, steps_per_epoch, args)
            lr = set_lr(optimizer, lr_at(step, total_steps, warmup_steps, args.lr))
            started = time.time()
            with checkpoints.out_of_memory_stops(pairs, args):
                stats, tokens = train_step(scorer, pairs, args, pad_id, layout, weight)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            metrics = read_step(stats, grad_norm, tokens, weight, started, lr, args)
            if finite_or_stop(metrics, step, indices, args):
                optimizer.step()
                metrics |= periodic(step + 1, total_steps, model, eval_set, monitor, pad_id, layout,
                                    args)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            else:
                metrics = {"skipped": "non-finite", "lr": lr}
            optimizer.zero_grad(set_to_none=True)
            logger.log(step + 1, metrics)
            # every N steps or minutes, on SIGTERM / Ctrl-C, and a sampling round's verdict
            saver.after_step(step + 1, total_steps, metrics.get("degeneration"))
    finish(model, tokenizer, out, saver, total_steps, logger, eval_set, layout, args)
    return out


# ---------------------------------------------------------------- one call per concern of the loop

class PairScorer(torch.nn.Module):
    """modeling.policy_logps as a module: DistributedDataParallel syncs the backward of its call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, average=True):
        return modeling.policy_logps(self.model, batch, average)


def pairs_of_step(train_set, step, steps_per_epoch, args):
    """This process's pairs of step `step`, their weight in the step's mean loss, and the step's
    pair indices. The order follows from (seed, epoch): resuming needs only `step`."""
    epoch, index = divmod(step, steps_per_epoch)
    seeded = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(train_set), generator=seeded)
    indices = order[index * args.batch_size:(index + 1) * args.batch_size].tolist()
    pairs, weight = parallel.share([train_set[i] for i in indices])
    return pairs, weight, indices


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """The learning rate of 0-based step `step`: a linear warm-up whose last step is at the peak
    (early rewards are noisy), then a cosine towards 0, one step past the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    peak_step = max(warmup_steps - 1, 0)
    progress = (step - peak_step) / (total_steps - peak_step)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def read_step(stats, grad_norm, tokens, weight, started, lr, args):
    """The step's metrics over all processes, read from the device once (each read waits for the
    GPU), before optimizer.step(): a non-finite step never reaches the weights."""
    # a process whose share of a short last step was empty ran a pair that counts nowhere
    if weight == 0:
        stats = stats[:, :0]
        tokens = tokens * 0
    losses, sft_losses, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = (
        parallel.gather(stats))
    numbers = torch.stack([losses.mean(), sft_losses.mean(), grad_norm.float(),
                           parallel.total(torch.as_tensor(tokens, device=stats.device).float())])
    loss, sft_loss, grad_norm, tokens = numbers.tolist()
    metrics = simpo.preference_metrics(chosen_logps, rejected_logps, chosen_rewards,
                                       rejected_rewards)
    metrics |= dict(loss=loss, grad_norm=grad_norm, lr=lr)
    metrics["tokens_per_s"] = tokens / (time.time() - started)
    return metrics | (dict(sft_loss=sft_loss) if args.sft_weight else {})


def finite_or_stop(metrics, step, indices, args):
    """True for a finite step; otherwise stop before the update (exit 3), or with --skip-nonfinite
    say so and return False (the caller drops the step's gradients)."""
    if all(map(math.isfinite, (metrics["loss"], metrics.get("sft_loss", 0), metrics["grad_norm"]))):
        return True
    where = (f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm "
             f"{metrics['grad_norm']} (training pairs {indices}, 0-based, in --split order after "
             f"holding out)")
    if not args.skip_nonfinite:
        raise StopRequested(f"{where}; the weights were not updated, the last checkpoint is intact "
                            f"(or pass --skip-nonfinite)", 3)
    tqdm.write(f"skipped {where}")
    return False


def periodic(step, total_steps, model, eval_set, monitor, pad_id, layout, args):
    """Held-out metrics every --eval-every steps, and generation health every --sample-every:
    "degeneration" is the round's verdict ("" healthy; in every process, the first samples)."""
    metrics = {}
    if args.eval_every and step % args.eval_every == 0 and step < total_steps and eval_set:
        metrics |= evaluate(model, eval_set, args, pad_id, layout)
    if args.sample_every and step % args.sample_every == 0:
        health, warning = monitor.round(step) if monitor else ({}, None)
        metrics |= health | {"degeneration": warning or ""}
        if warning:
            tqdm.write(warning)
    return metrics


def evaluate(model, examples, args, pad_id, layout):
    """Held-out metrics; under torchrun each process scores a slice and the slices are gathered."""
    # eval: no dropout
    model.eval()
    mine = [examples[i] for i in parallel.shard(range(len(examples)))]
    logps = torch.stack(modeling.pair_logps(model, mine, pad_id, args.micro_batch_size, layout,
                                            not args.no_length_normalization, "evaluating"))
    logps = parallel.gather(logps.to(next(model.parameters()).device)).cpu()
    model.train()
    metrics = modeling.reward_metrics(*logps, args.beta, args.gamma)
    return {f"eval/{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------- before and after the loop

def prepare_data(args, main_process):
    """Seeds, the demo's model, a checked output folder, the tokenizer, and the tokenized pairs
    (under torchrun by the first process; the others read its cache)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # built next to the run, not in it: eval.py loads it as the base model
    if args.demo:
        import demo
        # a tiny model gains nothing from threads, which spin-wait on a busy machine (10× slower)
        torch.set_num_threads(1)
        args.model = str((Path(args.output_dir).parent / "demo-model").resolve())
        if main_process:
            demo.build_tiny_model(args.model)
        parallel.barrier()
    checkpoints.prepare_output_dir(args, [args.model, args.dataset])
    # every process has checked the folder before the first one writes to it
    parallel.barrier()
    tokenizer = modeling.load_tokenizer(args.model, args.chat_template, args.trust_remote_code)
    # the run keeps the template it trains with, for eval.py and --resume
    if not args.resume:
        args.chat_template = tokenizer.chat_template
    # the first process tokenizes (and caches) while the others wait
    if not main_process:
        parallel.barrier()
    train_set, eval_set, summary = preferences.load_examples(
        tokenizer, args.dataset, args.split, args.eval_split, args.eval_fraction, args.seed,
        args.max_length, args.max_prompt_length)
    if main_process:
        parallel.barrier()
    # pairs kept and left out (and why), token lengths, where the tokenized data is cached
    print(summary)
    if not train_set:
        raise preferences.DataError(f"{args.dataset}: no training pairs left after holding out and "
                                    f"truncation")
    # before any work: a sampling round with no prompt would stop the run after its first step
    if args.sample_every and not eval_set:
        raise preferences.DataError(f"{args.dataset}: --sample-every samples held-out prompts, and "
                                    f"no held-out pair is left (see the counts above)")
    args.data_fingerprint = train_set.fingerprint()
    checkpoints.refuse_conflicts(args)  # again, with the data's fingerprint
    for line in data_notes(tokenizer, train_set, args):
        print(f"note: {line}")
    return tokenizer, train_set, eval_set


def data_notes(tokenizer, train_set, args):
    """What a run would otherwise do silently with data that fits it badly."""
    if len(train_set) < args.batch_size:
        yield (f"{len(train_set)} training pairs, fewer than --batch-size {args.batch_size}: each "
               f"step takes them all, one step per epoch")
    if tokenizer.chat_template is None:
        yield (f"{args.model} has no chat template: each pair is plain text (BOS, the prompt, then "
               f"each response and EOS); a chat model wants its template (--chat-template)")


def finish(model, tokenizer, out, saver, total_steps, logger, eval_set, layout, args):
    """The final save, then (unless a signal came in the last step) the final evaluation."""
    saver.save_final(total_steps)
    print(f"saved to {out}")
    if saver.signal:
        raise StopRequested(f"{signal.Signals(saver.signal).name} during the last step: the final "
                            f"save is complete, the final evaluation skipped (python eval.py "
                            f"--adapter {out} gives it)", 128 + saver.signal)
    if eval_set:
        after = evaluate(model, eval_set, args, tokenizer.pad_token_id, layout)
        logger.log(total_steps, after)
        print(f"held-out reward accuracy after training: {after['eval/rewards/accuracies']:.3f} "
              f"(margin {after['eval/rewards/margins']:.2f}, loss {after['eval/loss']:.3f})")
    if parallel.rank() == 0:
        checkpoints.plot_curves(out)


# ---------------------------------------------------------------- the command line

def parse_args(argv=None):
    from cli import count, non_negative, positive, positive_int, unit_interval
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SFT model folder or hub id (none for the offline demo)")
    g.add_argument("--load-in-4bit", action=on_off,
                   help="QLoRA: nf4, double quantisation, bf16 compute (default: on with CUDA)")
    g.add_argument("--full", action="store_true", help="full fine-tuning, not LoRA (small models)")
    g.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=positive_int, default=32, help="updates scale by alpha/r")
    g.add_argument("--lora-dropout", type=unit_interval, default=0.05, help="on the LoRA input")
    g.add_argument("--lora-target", type=cli.names, default="all-linear",
                   help="comma-separated module names, or all-linear")
    # SmolLM2-135M on a CPU at --max-length 256: 5.2 GB peak instead of 8.7, no slower there
    g.add_argument("--gradient-checkpointing", action=on_off, default=True,
                   help="much less memory; recomputes each layer in backward (~30%% slower on a "
                        "GPU)")
    g.add_argument("--chat-template", type=modeling.read_chat_template,
                   help="Jinja template (text or file) for a tokenizer without one")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a hub model ships with (only a model you trust)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=".jsonl/.json/.parquet/.csv file, folder or hub id")
    g.add_argument("--split", default="train", help="training split")
    g.add_argument("--eval-split", help="held-out split of the same dataset, e.g. test_prefs")
    g.add_argument("--eval-fraction", type=unit_interval, default=0.0,
                   help="hold out this fraction of --split instead")
    g.add_argument("--max-length", type=positive_int, default=2048, help="prompt + response tokens")
    g.add_argument("--max-prompt-length", type=positive_int, default=1800,
                   help="longer prompts lose their start")
    g = p.add_argument_group("SimPO objective")
    g.add_argument("--beta", type=positive, default=2.0, help="reward scale β")
    g.add_argument("--gamma", type=non_negative, help="target reward margin γ (default: 0.5)")
    g.add_argument("--gamma-beta-ratio", type=non_negative, help="γ/β, instead of --gamma")
    g.add_argument("--sft-weight", type=non_negative, default=0.0,
                   help="add this × the chosen responses' NLL per token")
    g.add_argument("--no-length-normalization", action="store_true",
                   help="reward from the summed log-prob (ablation)")
    g = p.add_argument_group("optimisation")
    # LoRA trains ~0.5% of the weights from zero: it wants more than the published full
    # fine-tuning rates (3e-7 to 1e-6); 5e-6 to 2e-5 is usual for LoRA preference tuning.
    g.add_argument("--lr", type=positive, default=1e-5, help="peak learning rate")
    g.add_argument("--warmup-ratio", type=unit_interval, default=0.1,
                   help="linear warm-up over this fraction of the steps, then cosine decay to 0")
    g.add_argument("--max-grad-norm", type=positive, default=1.0, help="gradient clipping")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the training pairs")
    g.add_argument("--max-steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="pairs per optimizer step")
    g.add_argument("--micro-batch-size", type=positive_int, default=2, help="pairs per forward")
    g.add_argument("--seed", type=int, default=42, help="data order, LoRA init, --eval-fraction")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="default runs/<timestamp>")
    g.add_argument("--save-every", type=count, default=0,
                   help="also checkpoint every N steps (0: off)")
    g.add_argument("--save-every-minutes", type=non_negative, default=30.0,
                   help="checkpoint every this many minutes (0: off)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="keep the newest N checkpoint-<step> folders")
    g.add_argument("--eval-every", type=count, default=0,
                   help="held-out evaluation every N steps (always at start and end)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last save")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is not finite instead of stopping")
    g.add_argument("--report-to", choices=["tensorboard", "wandb"], help="also log there")
    g = p.add_argument_group("processes (parallel.py)")
    g.add_argument("--nproc-per-node", type=positive_int, default=1,
                   help="data parallelism: this many processes, one per GPU (torchrun's launcher)")
    g = p.add_argument_group("generation health (generation.py)")
    g.add_argument("--sample-every", type=count, default=0, metavar="N",
                   help="every N steps, sample held-out prompts and log their health (0: off)")
    g.add_argument("--sample-prompts", type=positive_int, default=8, help="prompts per round")
    g.add_argument("--sample-max-new-tokens", type=positive_int, default=128,
                   help="tokens per sampled answer")
    g.add_argument("--stop-on-degeneration", action="store_true",
                   help=f"with --sample-every: after {generation.STOP_AFTER} degenerate rounds "
                        f"in a row, stop (exit {cli.DEGENERATED}), the last healthy round's "
                        f"model the run's; --resume continues from it")
    p.set_defaults(demo=False, run_config=None)
    args = p.parse_args(argv)
    if args.resume:
        # the saved run's settings, overridden by whatever is on this command line
        gamma_given = args.gamma is not None or args.gamma_beta_ratio is not None
        saved, defaults = checkpoints.resume_settings(args.resume, gamma_given)
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        args.run_config = saved
        args.output_dir = args.resume
        args.overwrite = False
        # a demo run resumes as the run it became: its model and data are in run_config.json
        args.demo = False
        args.resume_from = max(checkpoints.saved_steps(args.resume).items())[1]
    elif args.model is None and args.dataset is None:
        import demo
        p.set_defaults(**demo.TRAINING, demo=True)
        args = p.parse_args(argv)
    return check_args(args)


def check_args(args):
    """The rules that tie several flags together, and the defaults decided at run time."""
    if args.run_config and args.run_config.get("trust_remote_code") and not args.trust_remote_code:
        raise UsageError(f"--resume {args.resume}: the run's model ships its own Python code: "
                         f"pass --trust-remote-code again if you trust it (never read from a run)")
    if (args.model is None) != (args.dataset is None) and not args.demo:
        raise UsageError("pass both --model and --dataset, or neither for the offline demo")
    ratio = args.gamma_beta_ratio
    if None not in (args.gamma, ratio) and not math.isclose(args.gamma, ratio * args.beta):
        raise UsageError("--gamma and --gamma-beta-ratio are two ways of setting γ: pass one")
    if args.gamma is None:
        args.gamma = 0.5 if ratio is None else ratio * args.beta
    if args.micro_batch_size > args.batch_size:
        raise UsageError("--micro-batch-size cannot exceed --batch-size")
    if args.max_prompt_length > args.max_length:
        raise UsageError(f"--max-prompt-length {args.max_prompt_length} exceeds --max-length "
                         f"{args.max_length}")
    processes = parallel.launched_world_size()
    if processes > 1 and args.nproc_per_node not in (1, processes):
        raise UsageError(f"--nproc-per-node {args.nproc_per_node} under torchrun's {processes} "
                         f"processes: pass one of them")
    processes = max(processes, args.nproc_per_node)
    if args.batch_size % processes:
        raise UsageError(f"--batch-size {args.batch_size} pairs per step cannot be split evenly "
                         f"over {processes} processes: make it a multiple of {processes}")
    if args.report_to and importlib.util.find_spec(args.report_to) is None:
        raise UsageError(f"--report-to {args.report_to} needs: pip install {args.report_to}")
    if args.eval_split and args.eval_fraction:
        raise UsageError("pass --eval-split or --eval-fraction, not both")
    if args.stop_on_degeneration and not args.sample_every:
        raise UsageError("--stop-on-degeneration acts on sampling rounds: pass --sample-every N")
    if args.sample_every and args.full:
        raise UsageError("--sample-every compares the policy with its base, the model with its "
                         "LoRA adapter off: it needs LoRA, not --full")
    if args.sample_every and not (args.eval_split or args.eval_fraction):
        raise UsageError("--sample-every samples held-out prompts: pass --eval-split or "
                         "--eval-fraction")
    if args.full and args.load_in_4bit:
        raise UsageError("--full trains every weight: it cannot load them in 4-bit (drop "
                         "--load-in-4bit)")
    # QLoRA by default on a GPU, where memory is what runs out
    if args.load_in_4bit is None:
        args.load_in_4bit = torch.cuda.is_available() and not args.full
    # run_config.json must still find local paths from another folder
    for name in ("model", "dataset"):
        if getattr(args, name) and Path(getattr(args, name)).exists():
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    # before any work: the settings a resume may not change
    checkpoints.refuse_conflicts(args)
    return args


def say(line):
    """One write per message: the lines of processes under torchrun must not interleave."""
    sys.stderr.write(f"\n{line}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args = parse_args(argv)
        if args.nproc_per_node > 1 and parallel.launched_world_size() == 1:
            return parallel.launch(__file__, argv, args.nproc_per_node)
        train(args)
    except (preferences.DataError, UsageError) as error:
        say(f"error: {error}")
        return 2
    except StopRequested as stop:
        # a signal or degenerate samples stop every process alike: say it once
        alike = stop.exit_code > 128 or stop.exit_code == cli.DEGENERATED
        if not alike or parallel.rank() == 0:
            say(f"{'stopped' if alike else 'error'}: {stop}")
        return stop.exit_code
    # Ctrl-C outside the training steps (loading, or the final evaluation)
    except KeyboardInterrupt:
        say("interrupted: the run folder keeps its last complete save")
        return 130
    finally:
        parallel.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
