"""Did a SimPO run work? Held-out reward accuracy, KL(policy ‖ base SFT model), generation health.

    python eval.py --adapter runs/demo     # the run's held-out split, with the run's own settings
    python eval.py --adapter runs/llama3 --dataset HuggingFaceH4/ultrafeedback_binarized \
        --split test_prefs --generate 64 --out report.json
    python eval.py --model runs/demo-merged --ref-model runs/demo-model    # merge.py's output

A LoRA run's base is the same model with its adapter switched off: no second copy in memory. For a
full fine-tuning run (`--adapter` is the trained model folder) `--ref-model` names the base. A plain
model folder and its base can also be given as `--model` and `--ref-model`, with no `--adapter`; a
model merge.py wrote brings its run's settings (merged_from.json), so its run's held-out pairs are
scored.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import cli
import generation
import judge
import modeling
import packing
import preferences
import simpo
from cli import UsageError, non_negative, positive, positive_int


def run_settings(folder):
    """The settings of the run that `folder` comes from (a checkpoint's run_config.json is one
    folder up; merge.py keeps a merged model's in merged_from.json), with the base peft recorded."""
    merged = folder / "merged_from.json"
    if merged.is_file():
        # a merged model is 16-bit whatever its run trained on: 4-bit only when asked for
        return json.loads(merged.read_text())["run_config"] | {"load_in_4bit": None}
    configs = [f / "run_config.json" for f in (folder, folder.parent)]
    run = next((json.loads(f.read_text()) for f in configs if f.is_file()), {})
    if (folder / "adapter_config.json").is_file():
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        run.setdefault("model", adapter_config.get("base_model_name_or_path"))
    return run


def parse_args(argv=None):
    epilog = ("Defaults of --model, --dataset, --beta, --gamma, the lengths and --load-in-4bit: "
              "the run's. eval.py runs in one process, also on torchrun runs.")
    p = cli.Parser(description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--adapter", help="LoRA run or checkpoint, or full model folder (none: --model "
                                     "is the policy, --ref-model its base)")
    p.add_argument("--model", help="the base SFT model")
    p.add_argument("--ref-model", help="a full fine-tuning run's base (default: --model)")
    p.add_argument("--dataset", help="a file, folder or hub dataset")
    p.add_argument("--split", help="evaluate this whole split (default: the run's held-out pairs)")
    p.add_argument("--beta", type=positive, default=2.0, help="β of the reward margins")
    p.add_argument("--gamma", type=non_negative, default=0.5, help="target margin γ")
    p.add_argument("--max-length", type=positive_int, default=2048, help="prompt + response tokens")
    p.add_argument("--max-prompt-length", type=positive_int, default=1800, help="prompt tokens")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction,
                   default=torch.cuda.is_available(), help="a 4-bit base, as QLoRA trains")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward pass")
    p.add_argument("--chunk-size", type=positive_int, default=1024, help="tokens per KL chunk")
    p.add_argument("--generate", type=cli.count, default=0, metavar="N",
                   help="also sample N held-out prompts from policy and base: their health")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="with --generate")
    # Temperature 1 and no top-p: the sequence-level KL estimate is unbiased only on samples from π.
    p.add_argument("--temperature", type=positive, default=1.0, help="with --generate")
    top_p = cli.checked("in (0, 1]", lambda v: 0 < v <= 1)
    p.add_argument("--top-p", type=top_p, default=1.0, help="with --generate")
    p.add_argument("--seed", type=int, default=0, help="which prompts --generate samples, and how")
    p.add_argument("--judge", metavar="RM", help="with --generate: a reward model judges samples")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a hub model ships with (only for a model you trust)")
    p.add_argument("--out", help="write every number here as JSON (default: <adapter>/eval.json, "
                                 "or <model>/eval.json without --adapter)")
    p.add_argument("--samples", help="generated samples, JSONL (default: beside the report, "
                                     "samples.jsonl or <report>-samples.jsonl)")
    args = p.parse_args(argv)
    # no --adapter: --model is a plain model folder (merge.py's output, a --full run), scored
    # against --ref-model as `--adapter MODEL --ref-model BASE` scores it
    if args.adapter is None and not (args.model and args.ref_model):
        raise UsageError("pass --adapter (a run), or --model and --ref-model (a model folder "
                         "and its base)")
    flag = "--adapter" if args.adapter else "--model"
    adapter = Path(args.adapter or args.model)
    if not adapter.is_dir():
        raise UsageError(f"{flag} {adapter}: no such folder")
    if flag == "--model" and (adapter / "adapter_config.json").is_file():
        raise UsageError(f"--model {adapter} is a LoRA adapter: pass it as --adapter")
    # a data folder, or a run with no final save yet: say so before asking for other flags
    if not any((adapter / name).is_file() for name in ("adapter_config.json", "config.json")):
        message = f"{flag} {adapter}: neither a LoRA adapter nor a model folder"
        if saved := checkpoints.saved_steps(adapter):
            message += (f" (the run has no final save yet: evaluate {saved[max(saved)]}, or "
                        f"finish it with train.py --resume {adapter})")
        raise UsageError(message)
    run = run_settings(adapter)
    keys = ("model", "dataset", "beta", "gamma", "max_length", "max_prompt_length", "load_in_4bit")
    p.set_defaults(run=run, **{k: run[k] for k in keys if run.get(k) is not None})
    args = p.parse_args(argv)
    args.adapter = args.adapter or str(adapter)
    missing = [flag for flag, value in (("--model", args.model or args.ref_model),
                                        ("--dataset", args.dataset)) if value is None]
    if missing:
        kind = "a LoRA adapter" if (adapter / "adapter_config.json").is_file() else "a model folder"
        raise UsageError(f"{adapter} is {kind} with no run_config.json beside it: pass "
                         f"{' and '.join(missing)} (and --split for a folder or hub dataset)")
    if args.max_prompt_length > args.max_length:
        raise UsageError(f"--max-prompt-length {args.max_prompt_length} exceeds --max-length "
                         f"{args.max_length}")
    if args.judge and args.generate < judge.MIN_PROMPTS:
        raise UsageError(f"--judge compares sampled answers: pass --generate N, N >= "
                         f"{judge.MIN_PROMPTS} (fewer give no length-controlled win rate)")
    return args


def load_policy_and_base(args, device, dtype):
    """The trained policy, and a context manager that yields the base model."""
    adapter = Path(args.adapter)
    # full fine-tuning: two models (in eval mode, as from_pretrained gives them)
    if not (adapter / "adapter_config.json").is_file():
        policy, reference = (
            modeling.load_model(name, args.load_in_4bit, dtype, device, args.trust_remote_code)
            for name in (str(adapter), args.ref_model or args.model))
        return policy, lambda: contextlib.nullcontext(reference)
    from peft import PeftModel
    base = modeling.load_model(args.model, args.load_in_4bit, dtype, device, args.trust_remote_code)
    try:
        policy = PeftModel.from_pretrained(base, str(adapter)).eval()
    except (RuntimeError, ValueError, KeyError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
        raise UsageError(f"--adapter {adapter} does not fit --model {args.model} (it was trained "
                         f"on {args.run.get('model')}): {detail}") from None
    return policy, lambda: generation.without_adapter(policy)


def token_kl(policy_hidden, base_hidden, policy_head, base_head, labels, chunk_size=1024):
    """Exact KL(π ‖ π_base) over the vocabulary per response token, summed per sequence: (B,) sums,
    (B,) token counts. *_hidden: (B, T, H), labels: (B, T). Holds (chunk_size, V) logits at once."""
    mask = labels[:, 1:] != packing.IGNORE_INDEX
    policy_hidden, base_hidden = policy_hidden[:, :-1][mask], base_hidden[:, :-1][mask]  # (N, H)
    kl = [torch.zeros(0, device=labels.device)]
    for i in range(0, len(policy_hidden), chunk_size):
        log_p = simpo.project_logits(policy_hidden[i:i + chunk_size], **policy_head).log_softmax(-1)
        log_q = simpo.project_logits(base_hidden[i:i + chunk_size], **base_head).log_softmax(-1)
        # Σ_v π(v) (log π(v) − log π_base(v)) ≥ 0, but float32 rounding (~1e-7) can dip below 0
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0))
    sums = torch.zeros(mask.shape, device=labels.device).masked_scatter(mask, torch.cat(kl))
    return sums.sum(-1), mask.sum(-1)


@torch.no_grad()
def kl_to_base(policy, base_model, examples, pad_id, batch_size, chunk_size):
    """Mean per-token KL(policy ‖ base) over chosen and over rejected responses, and counts."""
    device = next(policy.parameters()).device
    kl_sums = torch.zeros(2, device=device)  # [chosen, rejected]
    token_counts = torch.zeros(2, device=device)
    for i in tqdm(range(0, len(examples), batch_size), desc="KL", leave=False):
        batch = packing.padded_rows(examples[i:i + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            policy_hidden, policy_head = modeling.final_hidden(policy, batch)
            with base_model() as base:
                base_hidden, base_head = modeling.final_hidden(base, batch)
            kl, tokens = token_kl(policy_hidden, base_hidden, policy_head, base_head,
                                  batch["labels"], chunk_size)
        kl_sums += kl.view(2, -1).sum(1)  # the batch is [chosen..., rejected...]
        token_counts += tokens.view(2, -1).sum(1)
    kl = (kl_sums / token_counts.clamp(min=1)).tolist()
    return {"kl/chosen": kl[0], "kl/rejected": kl[1],
            "kl/chosen_tokens": int(token_counts[0]), "kl/rejected_tokens": int(token_counts[1])}


def pairs_to_score(args):
    """(split, held-out fraction, the pairs in words)."""
    run, dataset = args.run, args.dataset
    same = run.get("dataset") is not None and (
        Path(dataset).resolve() == Path(run["dataset"]).resolve())
    if args.split and Path(dataset).is_file():  # as train.py refuses --eval-split
        raise UsageError(f"--split {args.split}: {dataset} is a single file (no splits): eval.py "
                         f"scores the run's held-out pairs of it, or all of a file the run did not "
                         f"train on")
    if args.split:
        return args.split, 0.0, f"split {args.split!r} of {dataset}"
    if Path(dataset).is_file() and not same:
        return "train", 0.0, f"all of {dataset}"
    if run.get("eval_split"):
        note = ", held out by the run" if same else ""
        return run["eval_split"], 0.0, f"split {run['eval_split']!r} of {dataset}{note}"
    if same and run.get("eval_fraction"):
        what = (f"the pairs the run held out of {dataset} (--eval-fraction "
                f"{run['eval_fraction']:g}, seed {run.get('seed', 0)})")
        return run.get("split", "train"), run["eval_fraction"], what
    if same:
        raise UsageError(f"the run held out no pairs of {dataset}: pass other data with --dataset "
                         f"(and --split for a folder or hub dataset)")
    raise UsageError(f"{dataset}: pass --split")


def trained_on(examples, tokenizer, args):
    """How many of `examples` the run trained on, by content: the same ids as one of its training
    pairs, whatever file or split they came from. None when the run's data cannot be read."""
    run = args.run
    if not run.get("dataset"):
        return None
    try:
        trained, _, _ = preferences.load_examples(
            tokenizer, run["dataset"], run.get("split", "train"), run.get("eval_split"),
            run.get("eval_fraction") or 0.0, run.get("seed", 0), args.max_length,
            args.max_prompt_length)
    except preferences.DataError:
        return None
    digests = set(trained.pair_digests())
    return sum(digest in digests for digest in examples.pair_digests())


def evaluate(args):
    # the demo's tiny model gains nothing from threads, which spin-wait on a busy machine (3×)
    if args.run.get("demo"):
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    # the base's tokenizer and the run's template, as train.py tokenized (not a re-saved copy)
    tokenizer = modeling.load_tokenizer(args.ref_model or args.model, None, args.trust_remote_code)
    trained_with = args.run.get("chat_template")
    if trained_with and trained_with != tokenizer.chat_template:
        print(f"note: {args.ref_model or args.model} has another chat template than the run "
              f"trained with: scoring with the run's")
        tokenizer.chat_template = trained_with
    split, fraction, scored = pairs_to_score(args)
    train_part, held_out, summary = preferences.load_examples(
        tokenizer, args.dataset, split, None, fraction, args.run.get("seed", 0), args.max_length,
        args.max_prompt_length)
    part, examples = ("held-out", held_out) if fraction else ("train", train_part)
    if not examples:
        raise preferences.DataError(f"{args.dataset}: no pairs to evaluate in split {split!r}")
    policy, base_model = load_policy_and_base(args, device, dtype)
    layout, line = modeling.choose_layout(policy, preferences.longest(examples))
    print(line)
    average = not args.run.get("no_length_normalization", False)
    # skipped and counts: of the pairs scored only, not of training's
    report = {"settings": {k: v for k, v in vars(args).items() if k != "run"},
              "pairs": len(examples), "scored": scored,
              "training_pairs": trained_on(examples, tokenizer, args),
              "skipped": summary.skipped(part), "counts": summary.counts[part]}
    pad_id = tokenizer.pad_token_id
    for name, context in (("policy", contextlib.nullcontext(policy)), ("base", base_model())):
        with context as model:
            logps = modeling.pair_logps(model, examples, pad_id, args.batch_size, layout, average,
                                        f"scoring {name}")
        report[name] = modeling.reward_metrics(*logps, args.beta, args.gamma)
    report |= kl_to_base(policy, base_model, examples, pad_id, args.batch_size, args.chunk_size)
    out = Path(args.out or Path(args.adapter) / "eval.json")
    if args.generate:
        # beside the report: an --out elsewhere never overwrites the run's own samples
        name = "samples.jsonl" if out.stem == "eval" else f"{out.stem}-samples.jsonl"
        samples = Path(args.samples or out.with_name(name))
        report |= sample_report(policy, base_model, tokenizer, examples, split, samples, device,
                                dtype, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_report(report, args)


def sample_report(policy, base_model, tokenizer, examples, split, path, device, dtype, args):
    """--generate: policy and base sampled on the same prompts (generation.py), each side's health,
    the sequence KL and the degeneration verdict; with --judge, the reward model's comparison
    (judge.py). The samples go to `path`, one JSON line each."""
    samples = generation.generate_samples(policy, base_model, tokenizer, examples, args.generate,
                                          args.max_new_tokens, args.temperature, args.top_p,
                                          args.seed, batch_size=args.batch_size)
    policy_health = generation.health(samples, "policy")
    base_health = generation.health(samples, "base")
    kl = generation.kl_sequence(samples)
    report = policy_health | base_health | kl | {"sampled": len(samples)}
    report["degeneration"] = generation.degeneration(policy_health, base_health, kl)
    # the reward model reads each prompt as messages, with its own chat template
    if args.judge:
        report["judge"] = judge.judge_samples(args, samples, split, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return report | {"samples": str(path)}


def print_report(report, args):
    print(f"\n{plural(report['pairs'], 'pair')} scored: {report['scored']} "
          f"(β={args.beta:g}, γ={args.gamma:g})")
    counts = report["counts"]
    print(f"left out: {counts['identical']} with chosen == rejected, {counts['emptied']} truncated "
          f"to nothing; {counts['truncated']} scored truncated")
    if report["training_pairs"]:
        print(f"warning: {report['training_pairs']} of these {plural(report['pairs'], 'pair')} "
              f"are pairs the run trained on: the accuracy says less about new data")
    print(f"{'':34}{'policy':>10}{'base':>10}")
    for key, label in (("rewards/accuracies", "reward accuracy"),
                       ("rewards/margins", "mean reward margin β·Δ"),
                       ("rewards/beyond_gamma", "pairs beyond margin γ"), ("loss", "SimPO loss")):
        print(f"{label:34}{report['policy'][key]:>10.3f}{report['base'][key]:>10.3f}")
    print(f"KL(policy ‖ base) per response token: chosen {report['kl/chosen']:.4f}, "
          f"rejected {report['kl/rejected']:.4f}")
    if "kl/sequence" in report:
        print(describe_samples(report, args))
    if "judge" in report:
        print(describe_judge(report["judge"]))


# the table of sampled answers: health key, label
HEALTH_ROWS = (("length", "  mean length (tokens)"), ("length_se", "    its standard error"),
               ("ended", "  ended at the end of turn"), ("cut", "  cut at --max-new-tokens"),
               ("empty", "  empty"), ("rep4", "  repeated 4-grams (seq-rep-4)"),
               ("distinct2", "  distinct bigrams (distinct-2)"))


def describe_samples(report, args):
    """The samples of policy and base: a table, the sequence KL, the degeneration warning."""
    lines = [f"{plural(report['sampled'], 'prompt')} sampled, policy and base (up to "
             f"{args.max_new_tokens} tokens):", f"{'':34}{'policy':>10}{'base':>10}"]
    for key, label in HEALTH_ROWS:
        policy = report[f"health/policy/{key}"]
        base = report[f"health/base/{key}"]
        lines.append(f"{label:34}{policy:>10.3f}{base:>10.3f}")
    # the mean of log π(y) − log π_base(y) over the policy's own samples: unbiased, so a few
    # samples can average below 0, which the KL itself never is
    lines.append(f"KL(policy ‖ base) per sampled sequence: {report['kl/sequence']:.3f} ± "
                 f"{report['kl/sequence_se']:.3f} (an unbiased estimate: noisy, below 0 at times "
                 f"on few samples; samples in {report['samples']})")
    return "\n".join(lines + [report["degeneration"] or ""]).rstrip()


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_judge(result):
    """The reward model's verdict (judge.compare's result). A number that could not be computed
    reads n/a."""
    def estimate(key):
        value, se = result[key], result[f"{key}_se"]
        if value is None:
            return "n/a"
        return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"

    def characters(name):
        value = result[f"length/{name}"]
        return "n/a" if value is None else f"{value:.0f}"

    n, wins, ties = result["prompts"], result["wins"], result["ties"]
    first = (f"judged by {result['reward_model']} on {plural(n, 'prompt')} (same seed for policy "
             f"and base)")
    if result["non_finite"]:
        first += f"; {result['non_finite']} more left out: a non-finite score"
    lc = estimate("lc_win_rate")
    if result["lc_win_rate"] is None:
        lc += f" (not estimated below {judge.MIN_PROMPTS} prompts)"
    elif not result["length_term"]:
        lc += " = the win rate (no length term: every prompt has the same length difference)"
    lines = [first,
             f"  the policy's answer scores higher on {wins}, lower on {n - wins - ties}, equal on "
             f"{ties}; mean characters: policy {characters('policy')}, base {characters('base')}",
             f"  win rate {estimate('win_rate')} (soft: the mean of σ(r_policy − r_base); a tie "
             f"counts half)",
             f"  length-controlled {lc}"]
    return "\n".join(lines)


def main(argv=None):
    try:
        evaluate(parse_args(argv))
    except (preferences.DataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
