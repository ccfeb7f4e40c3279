"""How often the degeneration rule fires on healthy runs, and how soon on collapsing ones: the
numbers behind --stop-on-degeneration's rule (generation.STOP_AFTER flagged rounds in a row).

    python bench/degeneration.py                  # demo seeds and a planted collapse: ~15 min
    python bench/degeneration.py --real-model     # + SmolLM2-135M at lr 3e-4 and 3e-3: ~50 min
    python bench/degeneration.py --real-model --out bench/degeneration.json   # the committed table

Every run trains with --sample-every and without --stop-on-degeneration, so each sampling round's
verdict (metrics.jsonl "degeneration") is recorded to the end; each stopping rule is then applied to
those verdicts: after 1 flagged round, after 2 in a row, after 3 in a row. Runs:
- demo, seeds 0..4: the offline demo (healthy: it learns the toy task), sampled every 8 steps;
- planted collapse, seeds 0..2: tests/test_health.py's model that learns to answer "APPLE APPLE ..."
  to every prompt, sampled every 2 steps;
- with --real-model: SmolLM2-135M-Instruct on 120 real UltraFeedback pairs (bench/real_model.py's
  settings) at lr 3e-4 (sound) and 3e-3 (collapses into word salad), sampled every 2 steps.
Prints the table and writes every round to --out (JSON).
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# The project's modules, from any working directory: imported after this line (hence noqa E402).
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import demo  # noqa: E402
import generation  # noqa: E402
import train  # noqa: E402

MODEL = os.environ.get("SIMPO_REAL_MODEL", "~/.cache/simpo-fixtures/smollm2-135m-instruct")
DATASET = REPO.parent / "shared" / "fixtures" / "real-data" / "ultrafeedback_trl_eval200.jsonl"
RULES = (1, 2, 3)


def rounds(out):
    """(step, verdict line or None) of every sampling round a run logged."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["degeneration"]) for row in rows if "degeneration" in row]


def stop_step(verdicts, after):
    """The step at which a run stops after `after` flagged rounds in a row (None: it never does)."""
    streak = 0
    for step, line in verdicts:
        streak = streak + 1 if line else 0
        if streak == after:
            return step
    return None


def planted_collapse(folder, seed):
    """tests/test_health.py's collapse: a peaked tiny model whose chosen answers repeat one word."""
    from transformers import AutoModelForCausalLM
    model = demo.build_tiny_model(folder / "model", hidden_size=32)
    peaked = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(25)
    peaked.save_pretrained(model)
    rng = random.Random(seed)
    rows = []
    for _ in range(48):
        words = rng.sample(demo.WORDS, 3)
        rows.append({"prompt": "shout: " + " ".join(words), "chosen": " ".join(["APPLE"] * 12),
                     "rejected": " ".join(w.upper() for w in words)})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["--model", str(model), "--dataset", str(folder / "pairs.jsonl"), "--max-length", "32",
            "--max-prompt-length", "16", "--batch-size", "4", "--micro-batch-size", "2",
            "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "24", "--lr", "1e-2",
            "--eval-fraction", "0.25", "--sample-every", "2", "--sample-prompts", "6",
            "--sample-max-new-tokens", "24", "--seed", str(seed)]


def real_model(folder, lr, model):
    """bench/real_model.py's runs, sampled every 2 of their 10 steps."""
    rows = DATASET.read_text().splitlines(keepends=True)
    (folder / "pairs.jsonl").write_text("".join(rows[:152]))
    return ["--model", model, "--dataset", str(folder / "pairs.jsonl"), "--eval-fraction",
            str(32 / 152), "--max-length", "256", "--max-prompt-length", "128", "--batch-size", "8",
            "--micro-batch-size", "4", "--max-steps", "10", "--beta", "2.5",
            "--gamma-beta-ratio", "0.55", "--lr", str(lr), "--seed", "0", "--sample-every", "2",
            "--sample-prompts", "8", "--sample-max-new-tokens", "64"]


def runs(args, workdir):
    """(name, kind, train.py flags) of every run, healthy ones first."""
    for seed in range(args.demo_seeds):
        yield (f"demo seed {seed}", "healthy",
               ["--output-dir", str(workdir / f"demo-{seed}" / "demo"), "--seed", str(seed),
                "--sample-every", "8"])
    if args.real_model:
        folder = workdir / "smollm2-3e-4"
        folder.mkdir(parents=True)
        yield "SmolLM2 lr 3e-4", "healthy", real_model(folder, 3e-4, args.model)
    for seed in range(args.collapse_seeds):
        folder = workdir / f"collapse-{seed}"
        folder.mkdir(parents=True)
        yield f"planted collapse seed {seed}", "collapse", planted_collapse(folder, seed)
    if args.real_model:
        folder = workdir / "smollm2-3e-3"
        folder.mkdir(parents=True)
        yield "SmolLM2 lr 3e-3", "collapse", real_model(folder, 3e-3, args.model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo-seeds", type=int, default=5, help="healthy demo runs")
    p.add_argument("--collapse-seeds", type=int, default=3, help="planted collapses")
    p.add_argument("--real-model", action="store_true", help="also the two SmolLM2 runs")
    p.add_argument("--model", default=MODEL, help="with --real-model: folder or hub id")
    p.add_argument("--out", default="runs/degeneration.json", help="every round, JSON")
    args = p.parse_args(argv)
    if Path(args.model).expanduser().exists():
        args.model = str(Path(args.model).expanduser())
    workdir = Path(tempfile.mkdtemp(prefix="simpo-degeneration-"))
    report = {"stop_after": generation.STOP_AFTER, "runs": []}
    try:
        for name, kind, flags in runs(args, workdir):
            out = Path(flags[flags.index("--output-dir") + 1]) if "--output-dir" in flags else (
                workdir / name.replace(" ", "-") / "run")
            flags = flags if "--output-dir" in flags else [*flags, "--output-dir", str(out)]
            if train.main(flags) != 0:
                raise SystemExit(f"{name}: train.py failed")
            verdicts = rounds(out)
            report["runs"].append({"name": name, "kind": kind, "rounds": verdicts,
                                   **{f"stops_after_{k}": stop_step(verdicts, k) for k in RULES}})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report):
    header = "".join(f"{f'stops after {k}':>16}" for k in RULES)
    print(f"\n{'run':28}{'rounds':>8}{'flagged':>9}{header}")
    for run in report["runs"]:
        flagged = sum(1 for _, line in run["rounds"] if line)
        stops = "".join(f"{str(run[f'stops_after_{k}'] or '-'):>16}" for k in RULES)
        print(f"{run['name']:28}{len(run['rounds']):>8}{flagged:>9}{stops}")


if __name__ == "__main__":
    main()
