"""Sampled answers and their health: does the policy still write answers, or has it degenerated?

The reward accuracy and the SimPO loss on held-out pairs can keep improving while the policy
collapses into repetition, never-ending answers or empty ones; only its own samples show that. Here:
sample policy and base on the same prompts with the same seeds, measure each side, compare the two.

Health of one side (`health`), over the sampled answers, the stop token not counted as answer:
  length, length_se   mean answer length in tokens, and its standard error
  ended, cut          fraction that ended at a stop token (end of turn), and that hit the limit
  empty               fraction whose answer shows no text (nothing but whitespace before the stop)
  rep4, rep4_se       seq-rep-4 (Welleck et al. 2019): 1 − distinct 4-grams / 4-grams of an
                      answer, averaged over the answers that have a 4-gram, and its standard error
  distinct2           distinct-2 (Li et al. 2016): distinct bigrams / bigrams over all answers
Standard errors are std / sqrt(n) (0 with fewer than two values). Deterministic for a seed.
"""
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import modeling
import packing
import preferences

# How far the policy may move from the base before `degeneration` calls it degenerate: seq-rep-4
# above the base's, the fraction ending at a stop token below it, empty answers above it, and the
# mean length below the base's / 2 or above the base's × 2.
MAX_REP4_RISE = 0.2
MAX_ENDED_DROP = 0.3
MAX_EMPTY_RISE = 0.2
LENGTH_FACTOR = 2.0
# KL(π ‖ π_base) per sampled token: word salad of ordinary length shows here, not in the counts
# above (SmolLM2-135M on UltraFeedback, bench/README.md: 0.002 after a sound run, 1.2 after a
# collapse)
MAX_KL_PER_TOKEN = 0.1
# train.py --stop-on-degeneration: degenerate rounds in a row that stop a run. No healthy round
# was flagged in 85, every collapse from its first round (bench/README.md): two cost one round of
# delay and keep one unlucky round of a few samples from stopping a healthy run
STOP_AFTER = 2


def sampling_config(model, tokenizer, temperature, top_p, max_new_tokens):
    """A GenerationConfig that samples from the model's softmax alone, and the stop tokens (sorted
    ids): the tokenizer's EOS, generation_config.json's, and the chat template's end of turn.
    transformers 5 fills every field a GenerationConfig leaves unset from the model's
    generation_config.json (repetition_penalty, min_new_tokens, ...): once this config is the
    model's own, the library's neutral defaults fill the rest (top_k's is 50, hence 0)."""
    from transformers import GenerationConfig
    listed = model.generation_config.eos_token_id or []
    stop = {tokenizer.eos_token_id, *(listed if isinstance(listed, list) else [listed])}
    # A chat model made from a base keeps the base's EOS in generation_config.json while its
    # template ends a turn with another token (SmolLM2 and Qwen2.5 bases: <|endoftext|>; ChatML
    # turns end at <|im_end|>); Gemma-2's turns end at <end_of_turn>, not at its EOS.
    terminator = preferences.end_of_turn(tokenizer).terminator
    if terminator:
        stop.add(tokenizer.convert_tokens_to_ids(terminator))
    stop = sorted(stop)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop)
    return config, stop


def sample_batch(model, prompts, pad_id, sampling, stop, seed):
    """One answer to each prompt (lists of ids), sampled together from the RNG seeded with `seed`,
    the prompts padded on the left: [(ids up to and including the first stop token, ended at
    one)]."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    attention_mask = torch.tensor(mask, device=device)
    torch.manual_seed(seed)
    rows = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                          generation_config=sampling)
    answers = []
    for ids in rows[:, width:].tolist():
        ends = [n for n, token in enumerate(ids) if token in stop]
        answers.append((ids[:ends[0] + 1], True) if ends else (ids, False))
    return answers


@contextlib.contextmanager
def sampling_from(model, sampling):
    """`sampling` as the generation config of every GenerationMixin in `model` (also inside a peft
    wrapper), restored afterwards: transformers 5 fills a GenerationConfig's unset fields from the
    model's own, so the neutral config must be the model's own while it samples."""
    from transformers import GenerationMixin
    generators = [m for m in model.modules() if isinstance(m, GenerationMixin)]
    saved = [m.generation_config for m in generators]
    try:
        for m in generators:
            m.generation_config = sampling
        yield model
    finally:
        for m, config in zip(generators, saved, strict=True):
            m.generation_config = config


@torch.no_grad()
def generate_samples(policy, base_model, tokenizer, examples, count, max_new_tokens,
                     temperature=1.0, top_p=1.0, seed=0, sides=("policy", "base"), batch_size=16):
    """Sample `count` prompts of `examples`, picked by a permutation seeded with `seed`, from each
    of `sides`: the policy, and the base (`base_model()`, a context manager that yields it). The
    prompts are sampled `batch_size` at a time (one token costs about as much for 16 prompts as for
    one on a CPU), each batch from the RNG seeded with `seed` + its first index, the same seed for
    both sides. With "policy" among the sides, each sample also gets the sequence log-ratio
    log π(y) − log π_base(y) of the policy's own answer y: its mean estimates the sequence-level
    KL(π ‖ π_base), unbiased at temperature 1 and top-p 1 only.

    Returns one dict per prompt: "row" (the pair's row in its split), "prompt" (text), and per side
    `name` (the answer's text), `name_ids` (up to and including the first stop token),
    `name_tokens` (len of those ids), `name_ended` (True if it stopped at a stop token, False if it
    hit the limit)."""
    sampling, stop = sampling_config(policy, tokenizer, temperature, top_p, max_new_tokens)
    models = {"policy": lambda: contextlib.nullcontext(policy), "base": base_model}
    rows = getattr(examples, "rows", range(len(examples)))
    seeded = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=seeded)[:count].tolist()
    samples = [{"row": int(rows[i]), "prompt_ids": preferences.generation_prompt(examples[i])}
               for i in order]
    # by batch of prompts: each is max_new_tokens forward passes of policy and base
    for start in tqdm(range(0, len(samples), batch_size), desc="sampling", unit="batch",
                      leave=False):
        batch = samples[start:start + batch_size]
        prompts = [sample["prompt_ids"] for sample in batch]
        for name in sides:
            with models[name]() as model, sampling_from(model, sampling):
                answers = sample_batch(model, prompts, tokenizer.pad_token_id, sampling, stop,
                                       seed + start)
            for sample, (ids, ended) in zip(batch, answers, strict=True):
                sample |= {name: tokenizer.decode(ids, skip_special_tokens=True),
                           f"{name}_ids": ids, f"{name}_tokens": len(ids), f"{name}_ended": ended}
        if "policy" in sides:
            ratios = log_ratios(policy, base_model, prompts, [s["policy_ids"] for s in batch],
                                tokenizer.pad_token_id)
            for sample, ratio in zip(batch, ratios, strict=True):
                sample["log_ratio"] = ratio
    for sample in samples:
        sample["prompt"] = tokenizer.decode(sample.pop("prompt_ids"))
    return samples


def log_ratios(policy, base_model, prompts, answers, pad_id):
    """log π(answer | prompt) − log π_base(answer | prompt) of each answer, summed over tokens."""
    device = next(policy.parameters()).device
    width = max(len(prompt) + len(answer) for prompt, answer in zip(prompts, answers, strict=True))
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, answer in zip(prompts, answers, strict=True):
        padding = width - len(prompt) - len(answer)
        rows["input_ids"].append(prompt + answer + [pad_id] * padding)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer)) + [0] * padding)
        ignored = packing.IGNORE_INDEX
        rows["labels"].append([ignored] * len(prompt) + answer + [ignored] * padding)
    batch = {key: torch.tensor(value, device=device) for key, value in rows.items()}
    difference = modeling.policy_logps(policy, batch, average=False)
    with base_model() as base:
        difference -= modeling.policy_logps(base, batch, average=False)
    return difference.tolist()


@contextlib.contextmanager
def without_adapter(model):
    """A peft model with its adapter switched off: the base model, with no second copy in memory."""
    with model.disable_adapter():
        yield model


def mean_and_se(values):
    """(mean, standard error of the mean); 0 for what fewer values cannot estimate."""
    if not values:
        return 0.0, 0.0
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(statistics.fmean(values)), float(se)


def health(samples, name):
    """The health of side `name` ("policy" or "base") of `samples` (see the module docstring): a
    dict of floats, keys "health/<name>/length", ".../length_se", "ended", "cut", "empty", "rep4",
    "rep4_se", "distinct2"."""
    answers = [s[f"{name}_ids"][:-1] if s[f"{name}_ended"] else s[f"{name}_ids"] for s in samples]
    ended = [float(s[f"{name}_ended"]) for s in samples]
    length, length_se = mean_and_se([float(len(a)) for a in answers])
    rep4 = []
    bigrams = []
    for answer in answers:
        grams = [tuple(answer[k:k + 4]) for k in range(len(answer) - 3)]
        if grams:
            rep4.append(1.0 - len(set(grams)) / len(grams))
        bigrams += [tuple(answer[k:k + 2]) for k in range(len(answer) - 1)]
    rep4, rep4_se = mean_and_se(rep4)
    result = {"length": length, "length_se": length_se, "ended": statistics.fmean(ended),
              "cut": 1.0 - statistics.fmean(ended),
              "empty": statistics.fmean([float(not s[name].strip()) for s in samples]),
              "rep4": rep4, "rep4_se": rep4_se,
              "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0}
    return {f"health/{name}/{key}": float(value) for key, value in result.items()}


def kl_sequence(samples):
    """The sequence-level KL(π ‖ π_base) estimate, the mean log-ratio of the policy's own samples,
    its standard error, and the same per sampled token (all log-ratios over all policy tokens, the
    stop tokens included as in the log-ratios): {"kl/sequence", "kl/sequence_se",
    "kl/sequence_per_token"}."""
    mean, se = mean_and_se([s["log_ratio"] for s in samples])
    tokens = sum(s["policy_tokens"] for s in samples)
    per_token = sum(s["log_ratio"] for s in samples) / max(tokens, 1)
    return {"kl/sequence": mean, "kl/sequence_se": se, "kl/sequence_per_token": per_token}


def degeneration(policy_health, base_health, kl=None):
    """None, or one line naming what degenerated in the policy's samples relative to the base's
    (both dicts of `health`): seq-rep-4 more than MAX_REP4_RISE above the base's; the fraction
    ending at a stop token more than MAX_ENDED_DROP below it; the fraction of empty answers more
    than MAX_EMPTY_RISE above it; the mean length below half or above twice the base's (a base
    length under 1 token counts as 1); or, given `kl` (of `kl_sequence`), a KL per sampled token
    above MAX_KL_PER_TOKEN: the base finds the policy's answers improbable, whatever their form."""
    policy = {key.rsplit("/", 1)[1]: value for key, value in policy_health.items()}
    base = {key.rsplit("/", 1)[1]: value for key, value in base_health.items()}
    problems = []
    # each signal with its value against its threshold
    if policy["rep4"] > base["rep4"] + MAX_REP4_RISE:
        problems.append(f"repetition (seq-rep-4 {policy['rep4']:.2f} > base {base['rep4']:.2f} + "
                        f"{MAX_REP4_RISE})")
    if policy["ended"] < base["ended"] - MAX_ENDED_DROP:
        problems.append(f"answers that do not end ({policy['ended']:.0%} end at the stop token < "
                        f"base {base['ended']:.0%} − {MAX_ENDED_DROP:.0%})")
    if policy["empty"] > base["empty"] + MAX_EMPTY_RISE:
        problems.append(f"empty answers ({policy['empty']:.0%} > base {base['empty']:.0%} + "
                        f"{MAX_EMPTY_RISE:.0%})")
    base_length = max(base["length"], 1.0)
    if not base_length / LENGTH_FACTOR <= policy["length"] <= base_length * LENGTH_FACTOR:
        problems.append(f"length ({policy['length']:.1f} tokens, outside base "
                        f"{base['length']:.1f} ÷ or × {LENGTH_FACTOR:g})")
    if kl is not None and kl["kl/sequence_per_token"] > MAX_KL_PER_TOKEN:
        problems.append(f"far from the base (KL {kl['kl/sequence_per_token']:.2f} > "
                        f"{MAX_KL_PER_TOKEN} nats per sampled token): read the samples")
    if not problems:
        return None
    return "warning: the policy's samples degenerate: " + "; ".join(problems)


class SampleMonitor:
    """Sampling during training, from fixed prompts with a fixed seed, that leaves training as it
    was: torch's RNG states (CPU and CUDA; sampling draws from nothing else) and each module's
    train/eval mode are restored. The model must be a peft model: the base is the same model with
    its adapter disabled.

        monitor = SampleMonitor(model, tokenizer, held_out, 8, 64, seed, out_dir)
        base_metrics = monitor.base()                   # once, before training
        metrics, warning = monitor.round(step)          # every N steps
    """

    def __init__(self, model, tokenizer, examples, count, max_new_tokens, seed, out_dir):
        self.model = model
        self.tokenizer = tokenizer
        self.examples = examples
        self.count = count
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.base_samples = None
        self.base_health = None

    def sample(self, sides):
        """Samples of `sides`, in eval mode (no dropout; and gradient checkpointing, which acts only
        in train mode, would turn off the KV cache), with every RNG state and module mode
        restored."""
        modes = [(module, module.training) for module in self.model.modules()]
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.model.eval()
        try:
            return generate_samples(self.model, lambda: without_adapter(self.model), self.tokenizer,
                                    self.examples, self.count, self.max_new_tokens, seed=self.seed,
                                    sides=sides)
        finally:
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
            for module, training in modes:
                module.training = training

    def base(self):
        """The base model's health on the monitor's prompts, computed once."""
        if self.base_samples is None:
            self.base_samples = self.sample(("base",))
            self.base_health = health(self.base_samples, "base")
        return self.base_health

    def round(self, step):
        """Sample the current policy: ({"health/policy/...", "kl/sequence", "kl/sequence_se",
        "sample/seconds"}, the `degeneration` line or None). Writes
        out_dir/samples-step-<step>.jsonl, each line with the base's answer to the same prompt
        beside the policy's."""
        base_health = self.base()
        # a duration: a clock that never goes back
        started = time.monotonic()
        samples = self.sample(("policy",))
        policy_health = health(samples, "policy")
        kl = kl_sequence(samples)
        metrics = policy_health | kl
        metrics["sample/seconds"] = time.monotonic() - started
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pairs = zip(self.base_samples, samples, strict=True)
        lines = "".join(json.dumps(base | sample) + "\n" for base, sample in pairs)
        (self.out_dir / f"samples-step-{step}.jsonl").write_text(lines)
        warning = degeneration(policy_health, base_health, kl)
        return metrics, warning if warning is None else f"step {step}: {warning}"
