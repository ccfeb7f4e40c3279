"""Train a chat model with SimPO (LoRA or 4-bit QLoRA, a plain PyTorch loop).

    python train.py        # offline demo: a tiny model learns a toy preference in a minute on 2 CPU cores
    python train.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --dataset princeton-nlp/llama3-ultrafeedback-armorm --eval-split test \
        --beta 10 --gamma-beta-ratio 0.3 --lr 5e-6

One optimizer step: `--batch-size` preference pairs, fed `--micro-batch-size` pairs per forward pass. Each
forward runs chosen and rejected responses together, [chosen..., rejected...], and scores only the response
tokens from the final hidden states (simpo.chunked_sequence_logps), never building full logits.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import modeling
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
    g.add_argument("--chat-template", help="a Jinja chat template (text or file) for tokenizers without one")
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
                   help="add this × the chosen responses' NLL (average per token)")
    g.add_argument("--no-length-normalization", action="store_true",
                   help="reward from the summed log-prob (ablation)")
    g = p.add_argument_group("optimisation")
    # LoRA trains ~0.5% of the weights from zero, so it wants a larger rate than the published full
    # fine-tuning rates (3e-7 to 1e-6); 5e-6 to 2e-5 is the usual range for LoRA preference tuning.
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up, then cosine decay to 0")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32, help="pairs per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=2,
                   help="pairs per forward pass; accumulation is derived")
    g.add_argument("--seed", type=int, default=42, help="data order, LoRA init, --eval-fraction split")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="default runs/<timestamp>")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out evaluation every N steps (always at start and end)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    g.add_argument("--report-to", choices=["tensorboard", "wandb"],
                   help="also log there (needs that package)")
    args = p.parse_args(argv)
    if args.resume:  # the saved run's settings, overridden by whatever is on this command line
        saved = Path(args.resume) / "run_config.json"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: no run_config.json there")
        saved = json.loads(saved.read_text())
        if args.gamma is not None or args.gamma_beta_ratio is not None:  # γ given again replaces the saved
            saved.update(gamma=None, gamma_beta_ratio=None)
        elif saved.get("gamma_beta_ratio") is not None:  # recompute γ from the ratio, in case β changes
            saved["gamma"] = None
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        args.output_dir, args.overwrite = args.resume, False
    elif args.model is None and args.dataset is None:  # the offline demo
        import demo
        p.set_defaults(**demo.TRAINING, demo=True)
        args = p.parse_args(argv)
    return check_args(args)


def check_args(args):
    modeling.require_positive(args, "batch_size", "micro_batch_size", "epochs", "max_steps", "max_length",
                              "max_prompt_length",
                     "lora_r", "lora_alpha")
    if args.max_prompt_length > args.max_length:
        raise UsageError(f"--max-prompt-length {args.max_prompt_length} exceeds "
                         f"--max-length {args.max_length}")
    if args.max_grad_norm <= 0 or args.save_every < 0 or args.eval_every < 0:
        raise UsageError("--max-grad-norm must be > 0, --save-every and --eval-every >= 0")
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
    args.output_dir = args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    return args


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:  # linear warm-up to the peak at step `warmup_steps`: early rewards are noisy
        return peak_lr * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))  # cosine decay towards 0


def evaluate(model, examples, args, pad_id):
    model.eval()  # no dropout
    logps = modeling.pair_logps(model, examples, pad_id, args.micro_batch_size,
                                not args.no_length_normalization, "evaluating")
    metrics = modeling.reward_metrics(*logps, args.beta, args.gamma)
    model.train()
    return {f"eval/{k}": v for k, v in metrics.items()}


def save(model, tokenizer, folder, step, optimizer):
    """Adapter (or model) in the usual format, plus everything `--resume` needs to continue exactly."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               Path(folder) / "training_state.tmp")
    # a crash mid-write leaves the old one
    os.replace(Path(folder) / "training_state.tmp", Path(folder) / "training_state.pt")


def restore(model, optimizer, run_dir):
    """Load the latest checkpoint of `run_dir` (the final save counts too); returns its step."""
    checkpoints = sorted(Path(run_dir).glob("checkpoint-*/training_state.pt"),
                         key=lambda f: int(f.parent.name.removeprefix("checkpoint-")))
    final = Path(run_dir) / "training_state.pt"
    if not final.is_file() and not checkpoints:
        return 0
    state = torch.load(final if final.is_file() else checkpoints[-1], weights_only=False)
    # strict=False: frozen weights are absent
    if model.load_state_dict(state["trainable"], strict=False).unexpected_keys:
        raise UsageError(f"--resume {run_dir}: the checkpoint does not fit this model "
                         f"(other --lora-target or --full?)")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


class Logger:
    """metrics.jsonl, plus tensorboard or wandb when asked for."""

    def __init__(self, out, report_to, config, start_step):
        self.path = out / "metrics.jsonl"
        old = self.path.read_text().splitlines() if self.path.exists() else []
        # drop what a crash left past the checkpoint
        kept = [line for line in old if json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = self.wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(project="simpo", config=config, dir=str(out))

    def log(self, step, metrics):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
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


def accumulate_gradients(model, pairs, args, pad_id):
    """Forward and backward over one optimizer step's pairs, `--micro-batch-size` at a time.
    Returns the detached per-pair (SimPO losses, SFT losses, chosen logps, rejected logps, chosen rewards,
    rejected rewards) as one (6, pairs) tensor and the step's token count (prompt + response of both
    sequences, no padding), both left on the device."""
    device, average, logs, tokens = next(model.parameters()).device, not args.no_length_normalization, [], 0
    # each prompt once, no padding (modeling.build_batch), unless the model's attention cannot take it
    shared = modeling.shared_layout_problem(model, args.max_length) is None
    for i in range(0, len(pairs), args.micro_batch_size):
        batch = modeling.build_batch(pairs[i:i + args.micro_batch_size], pad_id, shared, args.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            chosen_logps, rejected_logps = modeling.policy_logps(model, batch, average).chunk(2)
        losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(chosen_logps, rejected_logps,
                                                                    args.beta, args.gamma)
        n_chosen = batch["response_tokens"][: len(chosen_logps)].clamp(min=1)
        sft_losses = -(chosen_logps if average else chosen_logps / n_chosen)  # NLL per chosen token
        # Sum over the micro-batch, divided by the pairs in the whole step: the step's loss is the mean
        # over all its pairs however they are split, so 1×8 and 4×2 give the same update.
        ((losses + args.sft_weight * sft_losses).sum() / len(pairs)).backward()
        logs.append(torch.stack([losses.detach(), sft_losses.detach(), chosen_logps.detach(),
                                 rejected_logps.detach(), chosen_rewards, rejected_rewards]))
        tokens += batch["sequence_tokens"].sum()
    return torch.cat(logs, dim=1), tokens


def train(args):
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
    if not args.resume and out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--output-dir {out} is not empty: pass --overwrite to replace it, "
                         f"or --resume {out}")
    # bf16 is slow on CPUs
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if getattr(args, "demo", False):  # built next to the run, not in it: eval.py loads it as the base model
        import demo
        args.model = demo.build_tiny_model(out.parent / "demo-model")
    for name in ("model", "dataset"):  # run_config.json must still find local paths from another folder
        value = getattr(args, name)
        if Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    tokenizer = modeling.load_tokenizer(args.model, args.chat_template)
    train_set, eval_set, skipped = data.load_examples(tokenizer, args.dataset, args.split, args.eval_split,
                                                      args.eval_fraction, args.seed, args.max_length,
                                                      args.max_prompt_length)
    print(f"{len(train_set)} training pairs, {len(eval_set)} held-out, "
          f"{skipped} skipped (response truncated to nothing)")
    if not train_set:
        raise data.DataError(f"{args.dataset}: no training pairs left after holding out and truncation")
    model = modeling.prepare_model(args, device, dtype)
    print(modeling.describe_layout(model, args.max_length))
    if args.overwrite and not args.resume:  # only now: a run that fails on its input or model deletes nothing
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    (out / "run_config.json").write_text(json.dumps(config, indent=2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = restore(model, optimizer, out) if args.resume else 0
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    if start >= total_steps:
        print(f"{out} finished all {total_steps} steps already")
        return out
    logger = Logger(out, args.report_to, config, start)
    pad_id = tokenizer.pad_token_id
    if eval_set and start == 0:
        before = evaluate(model, eval_set, args, pad_id)
        logger.log(0, before)
        print(f"held-out reward accuracy before training: {before['eval/rewards/accuracies']:.3f}")

    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="training")
    for step in bar:
        # the order follows from (seed, epoch): resuming needs only `step`
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
        pairs = [train_set[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]
        lr = lr_at(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.time()
        (losses, sft_losses, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards), tokens = \
            accumulate_gradients(model, pairs, args, pad_id)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Read from the device once per step, not per micro-batch: each read waits for the GPU to catch up.
        loss, sft_loss, grad_norm, tokens = torch.stack([losses.mean(), sft_losses.mean(), grad_norm.float(),
                                                         tokens.float()]).tolist()
        metrics = simpo.preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=lr, tokens_per_s=tokens / (time.time() - started))
        if args.sft_weight:
            metrics["sft_loss"] = sft_loss
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps and eval_set:
            metrics.update(evaluate(model, eval_set, args, pad_id))
        logger.log(step + 1, metrics)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(model, tokenizer, out / f"checkpoint-{step + 1}", step + 1, optimizer)

    if eval_set:
        after = evaluate(model, eval_set, args, pad_id)
        logger.log(total_steps, after)
        print(f"held-out reward accuracy after training: {after['eval/rewards/accuracies']:.3f} "
              f"(margin {after['eval/rewards/margins']:.2f}, loss {after['eval/loss']:.3f})")
    save(model, tokenizer, out, total_steps, optimizer)
    plot_curves(out)
    print(f"saved to {out}")
    return out


def main(argv=None):
    try:
        train(parse_args(argv))
    except (data.DataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
