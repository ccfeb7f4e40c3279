"""Turn a LoRA run into a plain model folder to serve: the adapter merged into its 16-bit base.

    python merge.py --adapter runs/demo --out runs/demo-merged
    python merge.py --adapter runs/llama3/checkpoint-400 --out models/llama3-simpo --dtype float32

Its one job: write a folder that `AutoModelForCausalLM.from_pretrained(out)` loads with no peft, and
check that it is the model the run trained. A script, not a train.py flag: a run is merged once,
after eval.py has said it worked, from the run folder or any of its checkpoint-N folders, and the
merge holds the whole 16-bit model in memory, which the machine that trained a 4-bit QLoRA run may
not have: merge on another (on a GPU when there is one; `CUDA_VISIBLE_DEVICES=` merges on the CPU).

What --out holds: the base (run_config.json's "model", or the adapter's base_model_name_or_path;
--model overrides) loaded in --dtype (bfloat16, or float32), never in 4-bit, even for a QLoRA run
(peft would merge into the 4-bit weights, rounding the update to nf4's coarse steps), with the
adapter merged by peft's merge_and_unload, in safetensors; the tokenizer with the run's chat
template (the base's may differ); generation_config.json whose eos_token_id adds the end-of-turn
token of that template to the model's own, so generation stops where training ended responses; and
merged_from.json, written last: the run, the base, the dtype, the check's numbers and the run's
settings, from which `eval.py --model OUT --ref-model BASE` scores the run's held-out pairs.

The check: the folder as saved, loaded back, against the adapter applied unmerged on the same
16-bit base, on --check-pairs of the pairs eval.py scores for the run (its held-out pairs; its first
training pairs if it held out none), as the max |difference| per token of average log-prob. Beyond
the tolerance merge.py refuses: everything is written into a temporary folder next to --out, renamed
into place only after the check, so --out is never half-written. Tolerances, measured on the CPU on
the demo run and on LoRA and QLoRA runs of SmolLM2-135M (held-out UltraFeedback pairs of up to 731
tokens), where the adapter itself moves these numbers by 0.5 to 1.1:
- float32: 1e-4. Measured at most 4e-6 (the demo: 1e-6): only the order of float32 sums.
- bfloat16: 0.2, the start-up check's 16-bit tolerance (also float32 on a GPU, which scores in bf16
  autocast; not measured on a GPU). Measured at most 0.06 (the demo: 0.002): bf16 rounds each merged
  weight W + ΔW to 8 bits where the adapter model keeps ΔW apart, and bf16 scoring alone moves the
  numbers by up to 0.02. An adapter that moves them by less than this cannot be told from its base:
  merge.py says so.
A QLoRA run trained its adapter on the 4-bit base, and eval.py --adapter evaluates it there:
merge.py also scores that model and prints how far the merged 16-bit one is from it. The shipped
model is the 16-bit one, without nf4's rounding: SmolLM2-135M's differs by max 1.5, mean 0.48 per
token (its base alone, nf4 against bf16: max 0.7, mean 0.28; larger models are not measured); the
tests' tiny model by max 0.02, mean 0.005.
"""
import argparse
import gc
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import checkpoints
import cli
import eval as evaluation
import modeling
import preferences
from cli import StopRequested, UsageError, positive_int

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# max |difference| per token of average log-prob, merged vs adapter (measured: module docstring)
TOLERANCE = {torch.bfloat16: 0.2, torch.float32: 1e-4}
# written last into --out: a folder merge.py finished, and the only kind --overwrite replaces
RECORD = "merged_from.json"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a LoRA run folder, or one of its checkpoint-N")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--model", help="the base model (default: the run's)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="of the merged weights")
    p.add_argument("--check-pairs", type=positive_int, default=16,
                   help="pairs the check scores (the run's held-out ones)")
    p.add_argument("--dataset", help="pairs for the check (default: the run's)")
    p.add_argument("--split", help="check on this split (default: the run's held-out pairs)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward pass")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model merge.py wrote at --out")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a hub model ships with (only for a model you trust)")
    args = p.parse_args(argv)
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise UsageError(f"--adapter {adapter}: no such folder")
    args.full_model = None
    if not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():
            args.full_model = adapter
            return args
        message = f"--adapter {adapter}: not a run (no adapter_config.json, no config.json)"
        if saved := checkpoints.saved_steps(adapter):
            message += (f"; the run has no final save yet: merge {saved[max(saved)]}, or finish it "
                        f"with train.py --resume {adapter}")
        raise UsageError(message)
    args.run = evaluation.run_settings(adapter)
    args.model = args.model or args.run.get("model")
    args.dataset = args.dataset or args.run.get("dataset")
    for flag, value in (("--model", args.model), ("--dataset", args.dataset)):
        if value is None:
            raise UsageError(f"no run_config.json next to {adapter}: pass {flag}")
    check_out(args)
    return args


def check_out(args):
    """Before any work: --out is new, empty, or (with --overwrite) a model merge.py wrote, and holds
    nothing this merge reads."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RECORD).is_file():
            raise UsageError(f"--out {out} is not empty and holds no merged model (no {RECORD}): "
                             f"pick an empty or new folder")
        if not args.overwrite:
            raise UsageError(f"--out {out} holds a merged model: pass --overwrite to replace it")
    for flag, path in (("--adapter", args.adapter), ("--model", args.model)):
        if Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"--out {out} holds {path}, the {flag} this merge reads: pick another")


def check_pairs(args, tokenizer):
    """(examples, the pairs in words): the first --check-pairs of those eval.py scores for the run,
    or of its training pairs if it held out none."""
    try:
        split, fraction, scored = evaluation.pairs_to_score(args)
    except UsageError:
        run_dataset = args.run.get("dataset")
        same = run_dataset and Path(args.dataset).resolve() == Path(run_dataset).resolve()
        if args.split or not same:
            raise
        split, fraction = args.run.get("split", "train"), 0.0
        scored = f"training pairs of {args.dataset}: the run held out none"
    train_part, held_out, _ = preferences.load_examples(
        tokenizer, args.dataset, split, None, fraction, args.run.get("seed", 0),
        args.run.get("max_length", 2048), args.run.get("max_prompt_length", 1800))
    part = held_out if fraction else train_part
    examples = preferences.Examples(part.columns, part.rows[:args.check_pairs])
    if not examples:
        raise preferences.DataError(f"{args.dataset}: no pairs to check the merge on")
    return examples, f"{len(examples)} pairs, {scored}"


def end_of_turn_ids(generation_config, tokenizer):
    """The ids generation stops at: the model's own EOS ids, and the end-of-turn token of the run's
    template (Llama-3's <|eot_id|>, Gemma-2's <end_of_turn>) that ended every trained response."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    terminator = preferences.end_of_turn(tokenizer).terminator
    if terminator is not None:
        ids.append(tokenizer.convert_tokens_to_ids(terminator))
    return list(dict.fromkeys(ids or [tokenizer.eos_token_id]))


def merge_into_base(policy):
    """peft's merge: W + (α/r)·BA into each base weight, the LoRA layers removed. safe_merge: NaN in
    a merged weight stops here."""
    try:
        return policy.merge_and_unload(progressbar=True, safe_merge=True)
    except ValueError as error:
        raise StopRequested(f"merging fails: {str(error).strip().splitlines()[0]}", 1) from None


def save(model, tokenizer, folder):
    """Weights (transformers 5 writes safetensors only: no pickle to run when loading), the config,
    generation_config.json with the end-of-turn id, and the tokenizer with the run's template."""
    model.generation_config.eos_token_id = end_of_turn_ids(model.generation_config, tokenizer)
    model.save_pretrained(folder)
    checkpoints.save_tokenizer(tokenizer, folder)


def load(args, load_in_4bit, dtype, device):
    """The base in `dtype` (4-bit if asked) with the run's adapter applied, unmerged, as eval.py
    loads it; and a context manager that yields it with the adapter off."""
    settings = argparse.Namespace(**vars(args) | {"load_in_4bit": load_in_4bit})
    return evaluation.load_policy_and_base(settings, device, dtype)


def logps(model, examples, tokenizer, layout, args, desc):
    """Average log-prob per token of each response (2N,), [chosen..., rejected...]."""
    return torch.cat(modeling.pair_logps(model, examples, tokenizer.pad_token_id, args.batch_size,
                                         layout, True, desc))


def merge(args):
    """Merge and save into a temporary folder, load it back and check it, then rename it --out."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    # the base's tokenizer with the run's template, as train.py tokenized
    tokenizer = modeling.load_tokenizer(args.model, args.run.get("chat_template"),
                                        args.trust_remote_code)
    examples, scored = check_pairs(args, tokenizer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # what a merge killed before it could clean up left (hidden, never complete)
    for leftover in out.parent.glob(f".{out.name}.merging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    folder = out.parent / f".{out.name}.merging-{os.getpid()}"
    folder.mkdir()
    try:
        adapter_model = write_merged(args, tokenizer, examples, folder, device, dtype)
        record = check(args, tokenizer, examples, scored, adapter_model, folder, device, dtype)
        move_into_place(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it, no peft; "
          f"evaluate it with: python eval.py --model {out} --ref-model {record['model']}")


def write_merged(args, tokenizer, examples, folder, device, dtype):
    """The merged model saved in `folder`; the layout, and the adapter model's and the base's
    log-probs, scored before the merge changes the weights."""
    print(f"merging {args.adapter} into {args.model}, loaded in {args.dtype}")
    policy, adapter_off = load(args, False, dtype, device)
    layout, line = modeling.choose_layout(policy, preferences.longest(examples))
    print(line)
    adapter_logps = logps(policy, examples, tokenizer, layout, args, "scoring the adapter model")
    with adapter_off() as base:
        base_logps = logps(base, examples, tokenizer, layout, args, "scoring the base")
    save(merge_into_base(policy), tokenizer, folder)
    return argparse.Namespace(layout=layout, logps=adapter_logps, base_logps=base_logps)


def check(args, tokenizer, examples, scored, adapter_model, folder, device, dtype):
    """The model in `folder`, loaded as a server would, against the adapter model; refused beyond
    the tolerance. For a QLoRA run, also against the 4-bit model it trained. Writes the record."""
    # one model in memory at a time: the merge is gone, the folder as saved comes in
    gc.collect()
    merged = modeling.load_model(str(folder), False, dtype, device, args.trust_remote_code)
    layout = adapter_model.layout
    merged_logps = logps(merged, examples, tokenizer, layout, args, "scoring the merged model")
    del merged
    gc.collect()
    difference = (merged_logps - adapter_model.logps).abs().max().item()
    effect = (adapter_model.logps - adapter_model.base_logps).abs().max().item()
    # scored in bf16 on a GPU (autocast) whatever the weights
    tolerance = TOLERANCE[torch.bfloat16 if device == "cuda" else dtype]
    print(f"check on {scored}: merged vs adapter model, max |difference| per token of average "
          f"log-prob {difference:.2g} (tolerance {tolerance:g} in {args.dtype}); the adapter "
          f"itself moves them by up to {effect:.2g}")
    # "not <=": NaN fails too
    if not difference <= tolerance:
        raise StopRequested(f"the merged model differs from the adapter model by {difference:.3g} "
                            f"per token (tolerance {tolerance:g}): refusing it, nothing written "
                            f"to {args.out}", 1)
    if effect <= tolerance:
        print("note: the adapter changes these log-probs by no more than the tolerance: the check "
              "cannot tell this merge from its base")
    record = {"run": str(Path(args.adapter).resolve()), "model": args.model, "dtype": args.dtype,
              "check": {"pairs": scored, "max_difference": difference, "tolerance": tolerance,
                        "adapter_effect": effect},
              "run_config": args.run | {"model": args.model}}
    if args.run.get("load_in_4bit"):
        record["trained_4bit"] = compare_with_4bit(args, tokenizer, examples, layout,
                                                   merged_logps, device)
    (folder / RECORD).write_text(json.dumps(record, indent=2))
    return record


def compare_with_4bit(args, tokenizer, examples, layout, merged_logps, device):
    """A QLoRA run trained (and eval.py --adapter scores) its adapter on the 4-bit base: how far the
    merged 16-bit model is from that one, per token of average log-prob."""
    # eval.py's compute dtype: bf16 on a GPU, float32 on the CPU
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    trained, _ = load(args, True, compute, device)
    trained_logps = logps(trained, examples, tokenizer, layout, args, "scoring the 4-bit model")
    del trained
    gc.collect()
    difference = (merged_logps - trained_logps).abs()
    numbers = {"max_difference": difference.max().item(),
               "mean_difference": difference.mean().item()}
    print(f"4-bit base + adapter (as trained) vs this {args.dtype} merge: max |difference| "
          f"{numbers['max_difference']:.2g}, mean {numbers['mean_difference']:.2g} per token of "
          f"average log-prob")
    print("  the shipped model is the merge into the 16-bit base, not exactly the 4-bit model "
          "that trained: evaluate it (eval.py --model) before serving it")
    return numbers


def move_into_place(folder, out):
    """--out becomes the checked folder by a rename; a merged model it replaces (--overwrite) is
    moved aside first and deleted last, so --out is never a mix of the two."""
    replaced = folder.with_name(f"{folder.name}-replaced")
    if out.exists():
        out.replace(replaced)
    folder.replace(out)
    shutil.rmtree(replaced, ignore_errors=True)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.full_model:
            print(f"{args.full_model} is a full fine-tuning run, already a plain model folder: "
                  f"AutoModelForCausalLM.from_pretrained({str(args.full_model)!r}) loads it; "
                  f"nothing to merge")
            return 0
        merge(args)
    except (preferences.DataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StopRequested as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
