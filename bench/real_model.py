"""SmolLM2-135M-Instruct trained with SimPO on real UltraFeedback pairs, on a CPU, three ways: the
default (length-normalised), without length normalisation, and at a learning rate high enough to
degenerate.

    ../shared/fixtures/real-model/fetch-smollm2.sh     # once: the model folder; offline afterwards
    python bench/real_model.py                          # about 25 min on 2 CPU cores
    python bench/real_model.py --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset pairs.jsonl

The first --train-pairs rows of --dataset are the training pairs, the next --held-out-pairs the
held-out ones, each written to a file of its own. Each run goes through train.main, then eval.main
on the held-out file (reward accuracy and SimPO loss of policy and base, KL per token), then
generation.py samples the held-out prompts: each run's policy against the base, on the same prompts
with the same seed. Prints a table, and writes every number, a few samples of each run and the wall
times to --out.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# The project's modules, from any working directory: imported after this line (hence noqa E402).
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import eval  # noqa: E402
import generation  # noqa: E402
import modeling  # noqa: E402
import preferences  # noqa: E402
import train  # noqa: E402

MODEL = os.environ.get("SIMPO_REAL_MODEL", "~/.cache/simpo-fixtures/smollm2-135m-instruct")
DATASET = REPO.parent / "shared" / "fixtures" / "real-data" / "ultrafeedback_trl_eval200.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model folder or hub id ($SIMPO_REAL_MODEL)")
    p.add_argument("--dataset", default=str(DATASET), help="a JSONL file of preference pairs")
    p.add_argument("--train-pairs", type=int, default=120, help="the first N rows of --dataset")
    p.add_argument("--held-out-pairs", type=int, default=32, help="the N rows after those")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4, help="of the default and the no-LN run")
    p.add_argument("--high-lr", type=float, default=3e-3, help="of the degenerating run")
    p.add_argument("--samples", type=int, default=24, help="held-out prompts sampled per run")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--workdir", help="runs go here (default: a temporary folder)")
    # the committed numbers are updated only when asked for: --out bench/real-model.json
    p.add_argument("--out", default="runs/real-model.json", help="the report, JSON")
    args = p.parse_args(argv)
    if Path(args.model).expanduser().exists():  # a folder, not a hub id
        args.model = str(Path(args.model).expanduser())
    return args


def runs(args):
    """(name, train.py flags) of the three runs; the shared settings follow the paper's Llama-3
    recipe scaled to a CPU (β 2.5, γ/β 0.55, LoRA r 16)."""
    return [("default", ["--lr", str(args.lr)]),
            ("no-length-normalization", ["--lr", str(args.lr), "--no-length-normalization"]),
            ("high-lr", ["--lr", str(args.high_lr)])]


def train_and_eval(args, name, flags, workdir):
    """One run: train.main, then eval.main on the held-out pairs. Returns (run folder, numbers)."""
    out = workdir / name
    common = ["--model", args.model, "--dataset", str(workdir / "train.jsonl"),
              "--max-length", str(args.max_length),
              "--max-prompt-length", str(args.max_prompt_length),
              "--batch-size", str(args.batch_size),
              "--micro-batch-size", str(args.micro_batch_size),
              "--max-steps", str(args.steps), "--beta", "2.5", "--gamma-beta-ratio", "0.55",
              "--lora-r", "16", "--lora-alpha", "32", "--warmup-ratio", "0.1", "--seed", "0",
              "--output-dir", str(out), "--overwrite"]
    started = time.time()
    if train.main(common + flags) != 0:
        raise SystemExit(f"{name}: train.py failed")
    train_seconds = time.time() - started
    started = time.time()
    held_out = ["--dataset", str(workdir / "held-out.jsonl")]
    if eval.main(["--adapter", str(out), *held_out, "--out", str(out / "eval.json")]) != 0:
        raise SystemExit(f"{name}: eval.py failed")
    report = json.loads((out / "eval.json").read_text())
    numbers = {"flags": flags, "train_seconds": round(train_seconds, 1),
               "eval_seconds": round(time.time() - started, 1),
               "accuracy_before": report["base"]["rewards/accuracies"],
               "accuracy_after": report["policy"]["rewards/accuracies"],
               "loss_before": report["base"]["loss"], "loss_after": report["policy"]["loss"],
               "kl_per_token_chosen": report["kl/chosen"],
               "kl_per_token_rejected": report["kl/rejected"]}
    return out, numbers


def sample_base(args, held_out, tokenizer):
    """The base model sampled once on the held-out prompts: (its health, the samples)."""
    started = time.time()
    base = modeling.load_model(args.model).eval()
    samples = generation.generate_samples(base, lambda: contextlib.nullcontext(base), tokenizer,
                                          held_out, args.samples, args.max_new_tokens, seed=0,
                                          sides=("base",))
    base_health = generation.health(samples, "base")
    base_health["sample_seconds"] = round(time.time() - started, 1)
    return base_health, samples


def sample_run(args, run, held_out, tokenizer, base_samples):
    """The run's policy sampled on the held-out prompts: health, sequence KL, degeneration line."""
    from peft import PeftModel
    started = time.time()
    policy = PeftModel.from_pretrained(modeling.load_model(args.model), str(run)).eval()

    @contextlib.contextmanager
    def base_model():
        with policy.disable_adapter():
            yield policy

    samples = generation.generate_samples(policy, base_model, tokenizer, held_out, args.samples,
                                          args.max_new_tokens, seed=0, sides=("policy",))
    samples = [base | sample for base, sample in zip(base_samples, samples, strict=True)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    policy_health = generation.health(samples, "policy")
    base_health = generation.health(samples, "base")
    kl = generation.kl_sequence(samples)
    return {"sample_seconds": round(time.time() - started, 1), **policy_health, **kl,
            "degeneration": generation.degeneration(policy_health, base_health, kl),
            "examples": [{"prompt": s["prompt"], "policy": s["policy"], "base": s["base"]}
                         for s in samples[:4]]}


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="simpo-real-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # held out in a file of its own: train.py evaluates nothing, eval.py scores all of it
    rows = Path(args.dataset).read_text().splitlines(keepends=True)
    (workdir / "train.jsonl").write_text("".join(rows[:args.train_pairs]))
    end = args.train_pairs + args.held_out_pairs
    (workdir / "held-out.jsonl").write_text("".join(rows[args.train_pairs:end]))
    tokenizer = modeling.load_tokenizer(args.model)
    held_out, _, _ = preferences.load_examples(tokenizer, str(workdir / "held-out.jsonl"), "train",
                                        max_length=args.max_length,
                                        max_prompt_length=args.max_prompt_length)
    base_health, base_samples = sample_base(args, held_out, tokenizer)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
              "torch_threads": torch.get_num_threads(), "held_out_pairs": len(held_out),
              "base": base_health, "runs": {}}
    for name, flags in runs(args):
        run, numbers = train_and_eval(args, name, flags, workdir)
        numbers |= sample_run(args, run, held_out, tokenizer, base_samples)
        report["runs"][name] = numbers
        report["total_seconds"] = round(time.time() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_table(report)
    print(f"wrote {args.out}; runs in {workdir}")


def print_table(report):
    base = report["base"]
    columns = [("min", 6), ("acc", 12), ("loss", 14), ("KL/tok", 8), ("len", 7), ("end", 6),
               ("rep4", 6)]
    print("\n" + f"{'run':26}" + "".join(f"{name:>{width}}" for name, width in columns))
    print(f"{'base':26}{'':>6}{'':>12}{'':>14}{'':>8}{base['health/base/length']:>7.1f}"
          f"{base['health/base/ended']:>6.2f}{base['health/base/rep4']:>6.2f}")
    for name, r in report["runs"].items():
        accuracy = f"{r['accuracy_before']:.2f}→{r['accuracy_after']:.2f}"
        loss = f"{r['loss_before']:.3f}→{r['loss_after']:.3f}"
        print(f"{name:26}{r['train_seconds'] / 60:>6.1f}{accuracy:>12}{loss:>14}"
              f"{r['kl_per_token_chosen']:>8.4f}{r['health/policy/length']:>7.1f}"
              f"{r['health/policy/ended']:>6.2f}{r['health/policy/rep4']:>6.2f}")
        if r["degeneration"]:
            print(f"  {r['degeneration']}")


if __name__ == "__main__":
    main()
