"""Does the length-controlled win rate's standard error (judge.py) say how far the estimate moves?
Simulated judges whose preferences do not depend on length, at n prompts from 3 to 256.

    python bench/lc_se.py    # about 5 minutes of one core; a table, and bench/lc_se.json

Each replication draws n prompts: the two answers' lengths in characters and the policy's reward
(the base's is 0), independently, as a scenario says; judge.length_controlled, the function behind
judge.compare's LC, gives the estimate and its standard error. Over the replications,
ratio = mean reported standard error / standard deviation of the estimate: 1 is right, below 1
overconfident. judge.compare reports no LC below judge.MIN_PROMPTS prompts; this script measures
every n. Asserts nothing; tests/test_judge.py runs a smaller simulation at judge.MIN_PROMPTS.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

# The project's modules, from any working directory: imported after this line (hence noqa E402).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import judge  # noqa: E402


def independent(size, generator):
    return [torch.randint(50, 501, size, generator=generator) for _ in range(2)]


def longer_policy(size, generator):
    base = torch.randint(50, 501, size, generator=generator)
    return base + torch.randint(-150, 301, size, generator=generator), base


def log_normal(size, generator):
    return [(5.5 + 0.8 * torch.randn(size, generator=generator)).exp().round() for _ in range(2)]


# name: the policy's reward mean and sd (the base's is 0), (policy, base) lengths in characters
SCENARIOS = {"even, independent lengths": (0.0, 1.0, independent),
             "better, longer policy": (1.0, 2.0, longer_policy),
             "decisive judge, log-normal lengths": (0.0, 5.0, log_normal)}


def simulate(n, replications, scenario, seed=0):
    """Mean reported standard error / standard deviation of the LC estimate, over `replications`
    draws of n prompts in `scenario` (a SCENARIOS key)."""
    mean, sd, draw_lengths = SCENARIOS[scenario]
    generator = torch.Generator().manual_seed(seed)
    estimates, errors = [], []
    # the jackknife fits n·n prompts per replication: a chunk of them at a time
    chunk = max(1, 2 ** 20 // n ** 2)
    for start in range(0, replications, chunk):
        size = (min(chunk, replications - start), n)
        policy_lengths, base_lengths = draw_lengths(size, generator)
        rewards = mean + sd * torch.randn(size, generator=generator, dtype=torch.float64)
        lc, se, _ = judge.length_controlled(torch.sigmoid(rewards),
                                            (policy_lengths - base_lengths).double())
        estimates.append(lc)
        errors.append(se)
    return (torch.cat(errors).mean() / torch.cat(estimates).std()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 4, 5, 6, 8, 12, 16, 32, 64, 256])
    p.add_argument("--replications", type=int, default=10000)
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"mean reported se / sd of the LC estimate, {args.replications} replications; "
          f"judge.MIN_PROMPTS = {judge.MIN_PROMPTS}")
    print(f"{'n':>5}" + "".join(f"{name:>36}" for name in SCENARIOS))
    rows = []
    for n in args.sizes:
        ratios = {name: simulate(n, args.replications, name, seed=n) for name in SCENARIOS}
        rows.append({"n": n} | ratios)
        print(f"{n:>5}" + "".join(f"{ratio:>36.3f}" for ratio in ratios.values()), flush=True)
    Path(args.out).write_text(json.dumps({"replications": args.replications,
                                          "min_prompts": judge.MIN_PROMPTS, "ratios": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
