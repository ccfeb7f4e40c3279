"""Peak memory and speed of SimPO training steps as train.py takes them (LoRA or QLoRA, chunked
log-probs, each prompt computed once, no padding), against the padded layout (--padded) and TRL's
CPOTrainer (--trl: loss_type="simpo", cpo_alpha=0) on the same model, LoRA and pairs, in the same
run.

    python bench/step.py --shape llama3-8b --seq-len 2048 --trl  # GPU: one pair of 2 × 2048 tokens
    python bench/step.py --shape llama3-8b --lengths bench/lengths-ultrafeedback200.json \
        --batch-size 8 --micro-batch-size 4 --trl                # GPU: real lengths
    python bench/step.py --shape tiny --seq-len 64               # checks the script itself
(bench/README.md, Performance, has the CPU commands and numbers.)

Pairs: with --seq-len, identical-length pairs (prompt and each response seq_len/2 tokens); with
--lengths, the (prompt, chosen, rejected) token counts of a real dataset
(bench/lengths-ultrafeedback200.json: 200 UltraFeedback pairs, Llama-3 tokenizer, 2048/1800
truncation; `--make-lengths` writes such a file), drawn in a seeded order. Token ids are random;
prompts start with BOS and responses end with EOS, so TRL adds none and sees the very tokens
train.py sees. Builds a model of the given shape with random weights; each contender loads it (in
4-bit on CUDA) with LoRA r=16 on every linear layer and gradient checkpointing, in a process of its
own, and takes 1 + --steps optimizer steps of --batch-size pairs, --micro-batch-size per forward;
the first step is a warm-up. Prints and writes JSON; asserts nothing.

tokens/s counts the tokens of both sequences (prompt + chosen, prompt + rejected) without padding,
so it means the same for every contender however much it computes. Peak memory: CUDA's peak
allocation from the model's load, or on a CPU the process's peak resident memory (Python, torch and
all).
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The project's modules, from any working directory: imported after this line (hence noqa E402).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import modeling  # noqa: E402
import packing  # noqa: E402
import preferences  # noqa: E402
import train  # noqa: E402

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0),
    # Llama-3-8B scaled down for a CPU, keeping what decides where the time goes: the lm_head is 5%
    # of the body's weights (7.5% in the 8B), 4 query heads per key/value head, and a width of 1024,
    # so that the attention is not most of the work (per token it grows with length × width, the
    # weights with width²: at 3k tokens it does 0.5× the linear layers' work here, 0.1× in the 8B,
    # 1.5× at width 384).
    "cpu-small": dict(vocab_size=2048, hidden_size=1024, intermediate_size=3584,
                      num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4,
                      rope_theta=500000.0),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target="all-linear")
PAD, BOS, EOS = 0, 1, 2  # token ids 0-3 are special (3: unknown); the rest are ordinary


def load_lengths(path):
    """(prompt, chosen, rejected) token counts of every pair in a --lengths file."""
    return [tuple(pair) for pair in json.loads(Path(path).read_text())["lengths"]]


def make_lengths(dataset, tokenizer_dir, path, max_length=2048, max_prompt_length=1800):
    """Tokenize a dataset as train.py does and write its pair lengths (no text) to `path`."""
    tokenizer = modeling.load_tokenizer(tokenizer_dir)
    examples = preferences.load_examples(tokenizer, dataset, "train", max_length=max_length,
                                  max_prompt_length=max_prompt_length)[0]
    lengths = [[len(e["prompt"]), len(e["chosen"]), len(e["rejected"])] for e in examples]
    about = dict(dataset=Path(dataset).name, tokenizer=Path(tokenizer_dir).name,
                 max_length=max_length, max_prompt_length=max_prompt_length)
    Path(path).write_text(json.dumps(about)[:-1] + ', "lengths": [\n'
                          + ",\n".join(json.dumps(pair) for pair in lengths) + "\n]}\n")
    return lengths


def computed_tokens(lengths, micro_batch_size, packed):
    """Token positions the model runs over for these pairs, micro-batch by micro-batch, in
    train.py's layout (packed: packing.build_batch's rows, built for the longest sequence; else
    one padded row per sequence)."""
    layout = packing.Layout(packed, max(p + max(c, r) for p, c, r in lengths))
    total = 0
    for i in range(0, len(lengths), micro_batch_size):
        pairs = [dict(prompt=[BOS] * p, chosen=[EOS] * c, rejected=[EOS] * r)
                 for p, c, r in lengths[i:i + micro_batch_size]]
        total += packing.build_batch(pairs, PAD, layout)["input_ids"].numel()
    return total


def token_report(lengths, micro_batch_sizes=(2, 4), seed=42):
    """Computed token positions relative to the minimum (each prompt once, no padding), in
    train.py's random order, for the packed and padded layouts."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    lengths = [lengths[i] for i in order]
    minimum = sum(map(sum, lengths))
    return {f"micro_batch_{m}": {layout: computed_tokens(lengths, m, layout == "packed") / minimum
                                 for layout in ("packed", "padded")} for m in micro_batch_sizes}


def make_pairs(lengths, count, vocab_size, seed=0):
    """`count` pairs of random token ids with the given lengths, cycling through them in a seeded
    order."""
    rng = random.Random(seed)
    rounds = -(-count // len(lengths))  # ceil
    order = [i for _ in range(rounds) for i in rng.sample(range(len(lengths)), len(lengths))]

    def ids(n):
        return [rng.randrange(4, vocab_size) for _ in range(n)]
    return [dict(prompt=[BOS] + ids(p - 1), chosen=ids(c - 1) + [EOS], rejected=ids(r - 1) + [EOS])
            for p, c, r in (lengths[i] for i in order[:count])]


def max_length(steps, args):
    """train.py's --max-length for these pairs (truncation; TRL's max_length)."""
    return max([args.max_length] + [len(p["prompt"]) + len(p[side]) for step in steps for p in step
                                    for side in ("chosen", "rejected")])


def simpo_step_times(folder, steps, args, device, dtype, padded=False):
    settings = dict(model=folder, full=False, beta=2.5, gamma=1.4, sft_weight=0.0,
                    no_length_normalization=False, max_length=max_length(steps, args), **LORA)
    run = argparse.Namespace(**{**vars(args), **settings})
    model = modeling.prepare_model(run, device, dtype)
    # as train.py: rows and the check built for the longest sequence
    longest = max(len(p["prompt"]) + len(p[side]) for step in steps for p in step
                  for side in ("chosen", "rejected"))
    layout, line = modeling.choose_layout(model, longest)
    # --padded: the layout of models that cannot take the packed one
    print(line if not padded else "batches: padded (--padded)", file=sys.stderr)
    layout = layout._replace(packed=layout.packed and not padded)
    scorer = train.PairScorer(model)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for pairs in steps:
        started = time.perf_counter()
        # exactly train.py's forward and backward
        train.train_step(scorer, pairs, run, PAD, layout)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def trl_step_times(folder, steps, args, device, dtype):
    """TRL tokenizes text: a word-level tokenizer whose words are the token ids ("t17") gives it the
    same tokens."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    vocab_size = SHAPES[args.shape]["vocab_size"]
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1",
                                        eos_token="t2", unk_token="t3")
    rows = [{k: " ".join(f"t{i}" for i in ids) for k, ids in pair.items()}
            for step in steps for pair in step]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    model = modeling.load_model(folder, args.load_in_4bit, dtype, device)
    config = CPOConfig(output_dir=str(Path(folder) / "trl-output"), loss_type="simpo",
                       cpo_alpha=0.0, beta=2.5, simpo_gamma=1.4, learning_rate=1e-5,
                       max_steps=len(steps),
                       per_device_train_batch_size=args.micro_batch_size,
                       gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
                       train_sampling_strategy="sequential",  # the pairs of each step are ours
                       max_length=max_length(steps, args),
                       gradient_checkpointing=args.gradient_checkpointing,
                       bf16=device == "cuda", use_cpu=device == "cpu",
                       logging_steps=1, report_to=[], save_strategy="no", disable_dropout=False)
    lora = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                      lora_dropout=LORA["lora_dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
               processing_class=tokenizer, peft_config=lora, callbacks=[Timer()]).train()
    return times


def run_setup(args, device, dtype):
    """One contender, in this process (started by main for it alone, so that peak memory is its
    own)."""
    steps = json.loads((Path(args.scratch) / "steps.json").read_text())
    if args.setup == "trl":
        times = trl_step_times(args.scratch, steps, args, device, dtype)
    else:
        times = simpo_step_times(args.scratch, steps, args, device, dtype,
                                 args.setup == "simpo-padded")
    # both sequences, no padding
    tokens = [sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in step)
              for step in steps]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"setup": args.setup, "step_s": statistics.median(times[1:]),  # step 0 warms up
            "tokens_per_s": sum(tokens[1:]) / sum(times[1:]), "peak_gib": peak / 2**30}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--seq-len", type=int, default=64,
                   help="identical pairs: prompt and responses seq-len/2")
    p.add_argument("--lengths",
                   help="pair lengths of a real dataset (JSON, see bench/lengths-*.json)")
    p.add_argument("--make-lengths", nargs=2, metavar=("DATASET", "TOKENIZER"),
                   help="write --lengths from a dataset tokenized as train.py does, then stop")
    p.add_argument("--steps", type=int, default=5,
                   help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=1, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per forward pass")
    p.add_argument("--max-length", type=int, default=2048,
                   help="train.py's and TRL's --max-length (at least the longest sequence; "
                        "packed rows follow the longest sequence, as in train.py)")
    p.add_argument("--trl", action="store_true",
                   help="also time TRL's CPOTrainer (pip install trl)")
    p.add_argument("--padded", action="store_true", help="also time train.py with padded batches")
    p.add_argument("--no-load-in-4bit", dest="load_in_4bit", action="store_false")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                   action="store_false")
    p.add_argument("--out", default="runs/bench/step.json")
    # set by main for the process of one contender
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    args.load_in_4bit = args.load_in_4bit and cuda
    if args.make_lengths:
        lengths = make_lengths(*args.make_lengths, args.lengths)
        print(json.dumps(token_report(lengths)))
        return
    if args.setup:
        Path(args.out).write_text(json.dumps(run_setup(args, device, dtype)))
        return
    if args.batch_size % args.micro_batch_size:
        p.error("--batch-size must be a multiple of --micro-batch-size")
    from transformers import LlamaConfig, LlamaForCausalLM

    # deleted when main() returns: 16 GB for 8B
    scratch = tempfile.TemporaryDirectory(prefix="simpo-bench-")
    lengths = load_lengths(args.lengths) if args.lengths else [(args.seq_len // 2,) * 3]
    pairs = make_pairs(lengths, (args.steps + 1) * args.batch_size,
                       SHAPES[args.shape]["vocab_size"])
    steps = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
    (Path(scratch.name) / "steps.json").write_text(json.dumps(steps))
    longest = max_length(steps, args)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(8192, longest),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: minutes faster for 8B
        LlamaForCausalLM(config).to(dtype).save_pretrained(scratch.name)
    about = {"shape": args.shape, "pairs": args.lengths or f"2 x {args.seq_len} tokens",
             "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
             "steps": args.steps, "load_in_4bit": args.load_in_4bit,
             "gradient_checkpointing": args.gradient_checkpointing,
             "device": torch.cuda.get_device_name() if cuda else "cpu",
             "threads": torch.get_num_threads(),
             "peak_memory": "cuda max allocated" if cuda else "process max resident"}
    # computed token positions per step relative to the minimum (each prompt once, no padding)
    minimum = sum(len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    about["computed_tokens_vs_minimum"] = {
        layout: computed_tokens([tuple(map(len, p.values())) for p in pairs], args.micro_batch_size,
                                layout == "packed") / minimum
        for layout in ("packed", "padded")}
    print(json.dumps(about))
    results = []
    # the caller's thread count
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for setup in ["simpo"] + ["simpo-padded"] * args.padded + ["trl"] * args.trl:
        result_file = Path(scratch.name) / f"{setup}.json"
        subprocess.run([sys.executable, __file__, *argv, "--setup", setup,
                        "--scratch", scratch.name, "--out", str(result_file)], check=True, env=env)
        results.append({**about, **json.loads(result_file.read_text())})
        print(json.dumps({k: results[-1][k]
                          for k in ("setup", "step_s", "tokens_per_s", "peak_gib")}))
    for result in results[1:]:  # the project against each other contender
        result["project_speedup"] = results[0]["tokens_per_s"] / result["tokens_per_s"]
        result["project_memory_ratio"] = results[0]["peak_gib"] / result["peak_gib"]
        print(f"simpo vs {result['setup']}: {result['project_speedup']:.2f}x tokens/s, "
              f"{result['project_memory_ratio']:.2f}x peak memory")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
