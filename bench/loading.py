"""How fast and lean preferences.load_examples is, next to one batched tokenizer call over the same
conversations.

    python bench/loading.py  # 4,000 real pairs (the 200 fixture rows, varied), Llama-3
    python bench/loading.py --tokenizer ../shared/fixtures/real-tokenizers/gemma2-it --pairs 1000

Writes `--pairs` rows built from `--rows` (row k is row k mod N, its prompt tagged with k // N after
the first N so that no two are the same) to a temporary file, then times, in a fresh `datasets`
cache:
- the reference: one batched tokenizer call over every templated conversation (chosen and rejected),
- a first load_examples (reading the file, templating, tokenizing, writing the cache),
- a second one, which should read the cache and tokenize nothing,
each `--repeat` times, interleaved, keeping the fastest of each (the machine may be shared),
and counts the bytes of RAM the loaded pairs hold per token id. Prints the ratios and writes JSON;
asserts nothing (targets: first load <= 1.5x the reference, cached load <= 0.3x, <= 8 bytes per
token id).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The project's modules, from any working directory: imported after this line (hence noqa E402).
sys.path.insert(0, str(REPO))
import modeling  # noqa: E402
import preferences  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures"


def write_rows(source, n, path):
    rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for k in range(n):
            row = dict(rows[k % len(rows)])
            if k >= len(rows):  # a small variation: the same texts would tokenize the same anyway
                row["prompt"] = f"{row['prompt']}\n\n(variant {k // len(rows)})"
            f.write(json.dumps({key: row[key] for key in ("prompt", "chosen", "rejected")}) + "\n")
    return rows


def reference_seconds(tokenizer, path):
    """One batched tokenizer call over the templated conversations (templating itself not timed)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    conversations = [[{"role": "user", "content": row["prompt"]},
                      {"role": "assistant", "content": row[side]}]
                     for side in ("chosen", "rejected") for row in rows]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    started = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return time.perf_counter() - started, sum(map(len, ids))


def held_bytes(*examples):
    """RAM the loaded pairs hold: their id arrays (shared by train and held-out) and their
    positions."""
    arrays = {id(a): a for e in examples for column in e.columns.values() for a in column}
    return sum(a.nbytes for a in arrays.values()) + sum(e.rows.nbytes for e in examples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(FIXTURES / "real-tokenizers" / "llama3-instruct"))
    p.add_argument("--rows",
                   default=str(FIXTURES / "real-data" / "ultrafeedback_trl_eval200.jsonl"))
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=2, help="take the fastest of this many rounds")
    p.add_argument("--out", default="runs/bench/loading.json")
    args = p.parse_args(argv)
    import datasets.config

    tokenizer = modeling.load_tokenizer(args.tokenizer)
    default_cache, reference, times = datasets.config.HF_DATASETS_CACHE, [], []
    # interleaved, best of each: other work on the machine comes and goes
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            # a fresh cache: the first load does all the work
            datasets.config.HF_DATASETS_CACHE = Path(tmp)
            try:
                path = Path(tmp) / "pairs.jsonl"
                write_rows(args.rows, args.pairs, path)
                seconds, conversation_tokens = reference_seconds(tokenizer, path)
                reference.append(seconds)
                loads = []
                for _ in range(2):
                    started = time.perf_counter()
                    train, held_out, summary = preferences.load_examples(tokenizer, str(path),
                                                                         "train")
                    loads.append((time.perf_counter() - started, summary))
                times.append(loads)
            finally:
                datasets.config.HF_DATASETS_CACHE = default_cache
    reference = min(reference)
    first, cached = (min(run[i][0] for run in times) for i in range(2))
    summaries = times[-1][0][1], times[-1][1][1]
    times = [first, cached]
    token_ids = sum(len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in train)
    result = {"tokenizer": args.tokenizer, "pairs": args.pairs, "kept": len(train),
              "conversation_tokens": conversation_tokens, "token_ids_held": token_ids,
              "reference_s": reference, "first_load_s": times[0], "cached_load_s": times[1],
              "first_load_ratio": times[0] / reference, "cached_load_ratio": times[1] / reference,
              "second_load_read_cache": summaries[1].from_cache, "repeat": args.repeat,
              "bytes_per_token_id": held_bytes(train, held_out) / token_ids}
    print(summaries[0])
    print(f"one batched tokenizer call over {2 * args.pairs} conversations: {reference:.2f} s")
    print(f"first load {times[0]:.2f} s = {result['first_load_ratio']:.2f}x   (target <= 1.5x)")
    print(f"cached load {times[1]:.2f} s = {result['cached_load_ratio']:.2f}x   (target <= 0.3x; "
          f"read from the cache: {summaries[1].from_cache})")
    print(f"RAM held: {result['bytes_per_token_id']:.2f} bytes per token id   (target <= 8)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
