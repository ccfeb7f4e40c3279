"""On-policy preference pairs: answers sampled from the SFT model itself, scored by a reward model,
the best chosen and the worst rejected (the data of SimPO's Llama-3-Instruct v0.2 and Gemma-2 runs).

    python onpolicy.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --prompts HuggingFaceH4/ultrafeedback_binarized --split train_prefs \
        --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code --out data/llama3-onpolicy
    python train.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --dataset data/llama3-onpolicy --eval-split test ...

- Prompts: each row's `prompt` (text or messages), or the turns before the last of its `chosen`
  conversation, in file order; a prompt seen before is skipped.
- Sampling: each prompt templated exactly as train.py templates it; --samples answers at
  --temperature and --top-p (0.8 and 0.95, as published), none of the model's
  generation_config.json extras. Prompts go --batch-size at a time; answer k of the batch that
  starts at prompt i is drawn after torch.manual_seed(seed + i·samples + k), so a run stopped and
  resumed draws what one run draws.
- Pairs: answers cut at --max-new-tokens (no end of turn), empty or whitespace-only ones, and those
  the reward model scores NaN or ±inf are left out. Of the others, the reward model's best is chosen
  and its worst rejected. A prompt is left out when fewer than two answers remain, when those two
  texts are the same, or when their scores differ by --tie-tolerance or less. Each reason is
  counted.
- Output: OUT/samples.jsonl gets one line per prompt (every answer, its score, what became of it) as
  soon as its batch is scored. When all prompts are done, OUT/train.jsonl and OUT/test.jsonl (a
  seeded --test-fraction of the prompts) are written, in the conversational layout train.py reads.
- Resuming: Ctrl-C or SIGTERM finishes the batch in progress, then stops with the command that goes
  on (exit code 128 + the signal's number: 130, 143); during the last batch, the run ends as usual
  (the pairs written, exit code 0). That command continues after the last complete line of
  samples.jsonl, so a crash loses at most one batch. OUT/onpolicy.json keeps the settings a re-run
  must not change.
"""
import argparse
import collections
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import generation
import judge
import modeling
import preferences
from cli import UsageError

# A reply, so that a row with a prompt alone reads as a pair (preferences.to_pair)
PLACEHOLDER = {"role": "assistant", "content": "placeholder"}
# What decides the answers and the pairs: a re-run in the same folder must keep these
FIXED = ("model", "prompts", "split", "reward_model", "samples", "temperature", "top_p",
         "max_new_tokens", "seed", "test_fraction", "tie_tolerance", "chat_template",
         "load_in_4bit")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the SFT model to sample from: folder or hub id")
    p.add_argument("--prompts", required=True, help="a dataset of prompts: file, folder or hub id")
    p.add_argument("--split", default="train", help="the split of --prompts")
    p.add_argument("--reward-model", required=True, help="a sequence classifier with one output")
    p.add_argument("--out", required=True, help="output folder; the same command again continues")
    p.add_argument("--samples", type=int, default=5, help="answers per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (as "
                                                                  "published)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (as published)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="answers cut here are left out")
    p.add_argument("--seed", type=int, default=42,
                   help="the answers drawn, and which prompts are held out for test")
    p.add_argument("--test-fraction", type=float, default=0.05, help="prompts held out for test")
    p.add_argument("--tie-tolerance", type=float, default=0.0,
                   help="a prompt whose best and worst scores differ by this or less is left out")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per generate call; a re-run may change it (later answers differ)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="both models in nf4 with bf16 compute (default: on with CUDA)")
    p.add_argument("--chat-template", help="for an SFT tokenizer without one: text, or a file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a hub model ships with (only for a model you trust)")
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = p.parse_args(argv)
    if args.samples < 2 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--samples must be >= 2, --batch-size and --max-new-tokens >= 1")
    if not (args.temperature > 0 and 0 < args.top_p <= 1 and 0 <= args.test_fraction < 1
            # NaN fails these too
            and args.tie_tolerance >= 0):
        raise UsageError("--temperature must be > 0, --top-p in (0, 1], --test-fraction in [0, 1) "
                         "and --tie-tolerance >= 0")
    if args.load_in_4bit is None:
        args.load_in_4bit = torch.cuda.is_available()
    args.resume_command = shlex.join(["python", "onpolicy.py", *argv])
    return args


def read_prompts(dataset, split):
    """(messages, where) of each distinct prompt, in file order."""
    prompts = {}
    for i, row in enumerate(preferences.load_rows(dataset, split)):
        # a `prompt` of its own, text or messages
        if not isinstance(row.get("chosen"), list):
            row = {"prompt": row.get("prompt"), "chosen": [PLACEHOLDER], "rejected": [PLACEHOLDER]}
        messages = preferences.to_pair(row, f"{dataset}: row {i + 1}").prompt
        prompts.setdefault(json.dumps(messages), f"{dataset}: row {i + 1}")
    if not prompts:
        raise preferences.DataError(f"{dataset}: split {split!r} has no rows")
    return [(json.loads(key), where) for key, where in prompts.items()]


def resume(out, args, prompts):
    """How many prompts OUT/samples.jsonl holds, checked to be these prompts, drawn with these
    settings. A torn last line (a crash while writing) is cut off."""
    settings, recorded = {key: getattr(args, key) for key in FIXED}, out / "onpolicy.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = [f"--{key.replace('_', '-')} {before.get(key)}" for key in FIXED
                   if before.get(key) != settings[key]]
        if changed:
            raise UsageError(f"{out} holds answers drawn with {', '.join(changed)}: pass the same, "
                             f"or another --out")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=2))
    log = out / "samples.jsonl"
    text = log.read_bytes() if log.is_file() else b""
    complete = text[:text.rfind(b"\n") + 1]
    if len(complete) < len(text):
        with open(log, "r+b") as f:
            f.truncate(len(complete))
    lines = complete.decode().splitlines()
    for n, line in enumerate(lines):
        if n >= len(prompts) or json.loads(line)["prompt"] != prompts[n][0]:
            raise UsageError(f"{log}: line {n + 1} is not prompt {n + 1} of {args.prompts}: the "
                             f"prompts changed; pass another --out")
    return len(lines)


@torch.no_grad()
def sample(model, config, stop, prompts, samples, seed, bar=None):
    """`samples` answers to each prompt, drawn in one left-padded batch per answer: per prompt, a
    list of (token ids up to the stop token, whether max_new_tokens cut the answer before one).
    `bar` (tqdm) moves by one per answer."""
    width, pad = max(map(len, prompts)), config.pad_token_id
    input_ids = [[pad] * (width - len(ids)) + ids for ids in prompts]
    mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts]
    answers = [[] for _ in prompts]
    for k in range(samples):
        torch.manual_seed(seed + k)
        output = model.generate(input_ids=torch.tensor(input_ids, device=model.device),
                                attention_mask=torch.tensor(mask, device=model.device),
                                generation_config=config)
        for answer, ids in zip(answers, output[:, width:].tolist(), strict=True):
            end = next((n for n, token in enumerate(ids) if token in stop), len(ids))
            answer.append((ids[:end], end == len(ids)))
        if bar is not None:
            bar.update(len(prompts))
    return answers


def pick(answers, tolerance):
    """(chosen, rejected, None) of a prompt's answers, or (None, None, why the prompt is left out).
    Only finite scores count. Equal scores cannot make a pair: argmax and argmin would both take the
    first answer."""
    scored = [j for j, answer in enumerate(answers)
              if answer["score"] is not None and math.isfinite(answer["score"])]
    # first of each text
    distinct = list({answers[j]["text"]: j for j in reversed(scored)}.values())
    if len(scored) < 2:
        return None, None, "fewer than two answers"
    if len(distinct) < 2:
        return None, None, "identical"
    chosen = max(distinct, key=lambda j: answers[j]["score"])
    rejected = min(distinct, key=lambda j: answers[j]["score"])
    if answers[chosen]["score"] - answers[rejected]["score"] <= tolerance:
        return None, None, "tie"
    return chosen, rejected, None


def judge_batch(reward, prompts, answers, tokenizer, args):
    """A samples.jsonl record per prompt: its answers as text, scored unless cut or empty, and its
    pair. An answer scored NaN or ±inf is left out, its score None. `reward` is judge.load's
    (model, tokenizer)."""
    records = []
    for prompt, row in zip(prompts, answers, strict=True):
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in row]
        records.append({"prompt": prompt, "answers": [
            # (+ the stop token)
            {"text": text, "tokens": len(ids) + (not cut), "score": None,
             "left_out": "truncated" if cut else None if text.strip() else "empty"}
            for (ids, cut), text in zip(row, texts, strict=True)]})
    scored = [(record["prompt"], answer) for record in records for answer in record["answers"]
              if not answer["left_out"]]
    conversations = [prompt + [{"role": "assistant", "content": a["text"]}] for prompt, a in scored]
    for (_, answer), value in zip(scored, judge.score(*reward, conversations, args.batch_size),
                                  strict=True):
        if math.isfinite(value):
            answer["score"] = value
        else:
            answer["left_out"] = "non-finite score"
    for record in records:
        chosen, rejected, reason = pick(record["answers"], args.tie_tolerance)
        record |= {"chosen": chosen, "rejected": rejected, "left_out": reason}
    return records


def held_out(prompts, fraction, seed):
    """The indices of the test prompts: a `fraction` of `prompts`, at least one unless `fraction` is
    0, drawn by `seed` alone, so a resumed run holds out what one run holds out."""
    count = max(1, round(prompts * fraction)) if fraction else 0
    return set(random.Random(seed).sample(range(prompts), count))


def sample_all(args, out, prompts, prompt_ids, done, tokenizer):
    """Sample, score and append to OUT/samples.jsonl every prompt from `done` on."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = modeling.load_model(args.model, args.load_in_4bit, dtype, device,
                                args.trust_remote_code).eval()
    config, stop = generation.sampling_config(model, tokenizer, args.temperature, args.top_p,
                                              args.max_new_tokens)
    # (see generation.sampling_config)
    model.generation_config = config
    reward = judge.load(args.reward_model, args.load_in_4bit, dtype, device, args.trust_remote_code,
                        "--reward-model")
    test = held_out(len(prompts), args.test_fraction, args.seed)
    started, tokens = time.monotonic(), 0
    # by answer: a batch of 16 prompts at 5 answers each is minutes of sampling on a GPU
    bar = tqdm(total=len(prompts) * args.samples, initial=done * args.samples, desc="answers",
               unit="answer")
    stop_flag = cli.StopFlag("finishing this batch of prompts, then stopping")
    with open(out / "samples.jsonl", "a") as log, stop_flag, bar:
        for start in range(done, len(prompts), args.batch_size):
            batch = range(start, min(start + args.batch_size, len(prompts)))
            answers = sample(model, config, stop, [prompt_ids[i] for i in batch], args.samples,
                             args.seed + start * args.samples, bar)
            records = judge_batch(reward, [prompts[i][0] for i in batch], answers, tokenizer, args)
            log.write("".join(json.dumps({"index": i, "split": "test" if i in test else "train"}
                                         | record) + "\n"
                              for i, record in zip(batch, records, strict=True)))
            log.flush()
            # a prompt counts as done once it is on disk
            os.fsync(log.fileno())
            tokens += sum(len(ids) + (not cut) for row in answers for ids, cut in row)
            bar.set_postfix_str(f"{tokens / (time.monotonic() - started):.0f} tokens/s")
            if stop_flag.signal and batch[-1] + 1 < len(prompts):
                name = signal.Signals(stop_flag.signal).name
                raise cli.StopRequested(f"{name} after prompt {batch[-1] + 1} of "
                                                f"{len(prompts)}; resume with: "
                                                f"{args.resume_command}",
                                                128 + stop_flag.signal)


def write_pairs(out, with_test):
    """OUT/train.jsonl (and test.jsonl) from samples.jsonl, each written whole, then renamed into
    place. Returns the counts of pairs and of what was left out."""
    rows, counts = {"train": [], "test": []}, collections.Counter()
    for line in (out / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        counts.update(answer["left_out"] for answer in record["answers"] if answer["left_out"])
        if record["left_out"]:
            counts[record["left_out"]] += 1
            continue
        chosen, rejected = (record["answers"][record[side]] for side in ("chosen", "rejected"))
        rows[record["split"]].append({
            "prompt": record["prompt"],
            "chosen": record["prompt"] + [{"role": "assistant", "content": chosen["text"]}],
            "rejected": record["prompt"] + [{"role": "assistant", "content": rejected["text"]}],
            "score_chosen": chosen["score"], "score_rejected": rejected["score"]})
    for split in ("train", "test") if with_test else ("train",):
        temporary = out / f".{split}.jsonl.tmp"
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows[split]))
        os.replace(temporary, out / f"{split}.jsonl")
        counts[split] = len(rows[split])
    return counts


def build(args):
    out = Path(args.out)
    prompts = read_prompts(args.prompts, args.split)
    tokenizer = modeling.load_tokenizer(args.model, args.chat_template, args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise UsageError(f"--model {args.model}: its tokenizer has no chat template "
                         f"(pass --chat-template)")
    pairs = [preferences.Pair(messages, PLACEHOLDER, PLACEHOLDER, True, where)
             for messages, where in prompts]
    prompt_ids = preferences.generation_prompt_ids(tokenizer, pairs)
    done = resume(out, args, prompts)
    if done:
        print(f"{out / 'samples.jsonl'} holds {done} of {len(prompts)} prompts: continuing")
    if done < len(prompts):
        sample_all(args, out, prompts, prompt_ids, done, tokenizer)
    counts = write_pairs(out, args.test_fraction > 0)
    print(f"{len(prompts)} prompts: {counts['train']} training pairs and {counts['test']} test "
          f"pairs in {out}; left out: {counts['tie']} ties, {counts['identical']} identical, "
          f"{counts['fewer than two answers']} with fewer than two answers (answers left out: "
          f"{counts['truncated']} cut at --max-new-tokens, {counts['empty']} empty, "
          f"{counts['non-finite score']} with a non-finite score)")
    for line in warnings(counts, len(prompts) * args.samples, args):
        print(f"warning: {line}")
    return counts


def warnings(counts, answers, args):
    """What a run that exits 0 may still have got wrong: pairs too few to use."""
    if counts["truncated"] * 2 > answers:
        yield (f"{counts['truncated']} of {answers} answers hit --max-new-tokens "
               f"{args.max_new_tokens} and were left out: raise it")
    if not counts["train"]:
        yield "no training pairs: train.py has nothing to train on"
    if args.test_fraction and not counts["test"]:
        yield ("no test pairs: every held-out prompt was left out (train.py --eval-split test "
               "would have nothing to score)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        build(parse_args(argv))
    except (preferences.DataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except cli.StopRequested as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    # outside the sampling loop: while loading, or writing the pairs
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished prompts are kept; resume with: "
              f"{shlex.join(['python', 'onpolicy.py', *argv])}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
