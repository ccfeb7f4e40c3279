"""A reward model as judge: it scores onpolicy.py's answers and compares policy and base (eval.py).

    python eval.py --adapter runs/llama3 --generate 256 \
        --judge RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code

The reward model is an `AutoModelForSequenceClassification` with one output per conversation. A
model with its own output type (ArmoRM's `output.score`) runs its code only with
--trust-remote-code. Each conversation is rendered with the reward model's own chat template.

`compare` takes the rewards of the policy's and the base's answers to the same prompts. A prompt
where either reward is not finite (NaN, ±inf) says nothing about which answer is better: it is left
out and counted. Of the n others:
- win rate: soft, the mean over prompts of σ(r_policy − r_base), the probability that the judge
  prefers the policy's answer (Bradley–Terry); a tie counts half. Its standard error is sd/√n.
  `wins` counts the prompts where r_policy > r_base, `ties` those where the rewards are equal.
- length-controlled (LC) win rate: AlpacaEval 2's GLM (Dubois et al. 2024) with the length term
  only. Fit
      logit P(policy preferred) = θ + φ·tanh(Δ / sd(Δ)),  Δ = len(policy answer) − len(base answer)
  with lengths in characters, Δ scaled but not centred, so Δ = 0 still means equal lengths. The fit
  is maximum likelihood on the soft preferences σ(r_policy − r_base) plus a ridge penalty 0.01·φ²/2
  on φ alone (AlpacaEval: L1), which keeps φ finite when length alone decides every preference. LC
  is the prediction at Δ = 0, σ(θ). Its standard error is the jackknife's: the whole fit repeated
  with each prompt left out, se = √((n − 1)/n · Σᵢ(LCᵢ − mean LCᵢ)²), as for the win rate, whose
  jackknife is sd/√n. Unlike the sandwich (delta-method) estimate, it holds at small n: from
  MIN_PROMPTS prompts on it is within 10% of the estimate's actual spread (bench/README.md); with
  fewer, LC is not estimated (None). When every prompt has the same Δ, the length term cannot be
  fitted (`length_term` False): the fit is θ alone, and LC equals the win rate.
  AlpacaEval's own GLM also has an instruction-difficulty term, fitted on its 805 instructions
  across many models, and its judge is GPT-4: these numbers are not comparable with its leaderboard.
A number that cannot be computed is None, never NaN: the result goes into eval.json.
"""
import math

import torch
from jinja2 import TemplateError
from tqdm import tqdm

import modeling
import preferences
from cli import UsageError

# on φ only: an unpenalised θ makes LC equal the win rate when all lengths are equal
RIDGE = 1e-2
# Fewer compared prompts get no length-controlled win rate: its standard error would not hold
# (bench/lc_se.py measures it)
MIN_PROMPTS = 8


def load(name, load_in_4bit=False, dtype=torch.float32, device="cpu", trust_remote_code=False,
         flag="--judge"):
    """The reward model, in eval mode (in nf4 with `load_in_4bit`, as modeling.load_model), and its
    tokenizer. `flag` names it in error messages."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, dtype=dtype, quantization_config=modeling.quantization(load_in_4bit, dtype),
            device_map={"": device}, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise modeling.refused_remote_code(flag, name, error) from None
    # A causal LM loads too, with a random head in place of the missing one
    if info["missing_keys"]:
        raise UsageError(f"{flag} {name} is not a reward model: it has no trained "
                         f"{sorted(info['missing_keys'])[0]}")
    if tokenizer.chat_template is None:
        raise UsageError(f"{flag} {name}: its tokenizer has no chat template")
    return model.eval(), tokenizer


@torch.no_grad()
def score(model, tokenizer, conversations, batch_size=8):
    """The reward of each conversation (messages ending with the assistant's answer), as floats.

    Batches are right-padded, so a classifier that reads the last token before its pad id reads the
    token it reads unpadded. A model with no pad id in its config scores one conversation at a
    time."""
    if not conversations:
        return []
    try:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    except TemplateError as error:
        raise UsageError(f"the reward model's chat template fails: {error}") from None
    # the template writes BOS
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad = model.config.pad_token_id
    size = batch_size if pad is not None else 1
    device, scores = next(model.parameters()).device, []
    for i in tqdm(range(0, len(rows), size), desc="judging", unit="batch", leave=False):
        chunk = rows[i:i + size]
        width = max(map(len, chunk))
        input_ids = [row + [pad] * (width - len(row)) for row in chunk]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in chunk]
        output = model(input_ids=torch.tensor(input_ids, device=device),
                       attention_mask=torch.tensor(mask, device=device))
        # ArmoRM's custom output
        reward = getattr(output, "score", None)
        reward = (output.logits if reward is None else reward).float().reshape(len(chunk), -1)
        if reward.shape[1] != 1:
            raise UsageError(f"the reward model gives {reward.shape[1]} numbers per answer, "
                             f"not one")
        scores += reward[:, 0].tolist()
    return scores


def fit(preference, delta):
    """θ and φ of the length-controlled fit (module docstring) to each row, by Newton's method: a
    concave log-likelihood in two parameters. Shape: preference, delta (rows, n) → (rows, 2)."""
    spread = delta.std(dim=1, keepdim=True)
    # one Δ for every prompt: no length term, φ stays 0
    length = torch.where(spread > 0, torch.tanh(delta / spread), 0.0)
    # (rows, n, 2): θ's column of ones, φ's column
    features = torch.stack([torch.ones_like(length), length], 2)
    penalty = torch.tensor([0.0, RIDGE], dtype=torch.float64)
    weights = torch.zeros(len(delta), 2, dtype=torch.float64)
    for _ in range(100):
        fitted = torch.sigmoid(torch.einsum("rni,ri->rn", features, weights))
        gradient = torch.einsum("rn,rni->ri", fitted - preference, features) + penalty * weights
        hessian = (torch.einsum("rn,rni,rnj->rij", fitted * (1 - fitted), features, features)
                   + torch.diag(penalty))
        # pinv: when one model wins every prompt outright, σ(θ) reaches 1.0 and θ's curvature 0
        step = torch.einsum("rij,rj->ri", torch.linalg.pinv(hessian), gradient)
        weights -= step
        if step.abs().max() < 1e-12:
            break
    return weights


def length_controlled(preference, delta):
    """LC win rate, its jackknife standard error and φ (module docstring) of each row's prompts:
    soft preferences, length differences. Shape: preference, delta (rows, n), n >= 3 → (rows,)."""
    rows, n = preference.shape
    theta, phi = fit(preference, delta).T
    # row i: every prompt but the i-th
    others = torch.arange(n).repeat(n, 1)[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    left_out = fit(preference[:, others].flatten(0, 1), delta[:, others].flatten(0, 1))
    left_out = torch.sigmoid(left_out[:, 0]).view(rows, n)
    se = ((n - 1) / n * ((left_out - left_out.mean(1, keepdim=True)) ** 2).sum(1)).sqrt()
    return torch.sigmoid(theta), se, phi


def compare(policy_scores, base_scores, policy_lengths, base_lengths):
    """Win rate and length-controlled win rate of the policy over the base, one score and one length
    in characters per prompt and side (module docstring). JSON-safe: no NaN."""
    def tensor(values):
        return torch.as_tensor(values, dtype=torch.float64)

    policy, base = tensor(policy_scores), tensor(base_scores)
    finite = policy.isfinite() & base.isfinite()
    policy, base = policy[finite], base[finite]
    lengths = {"policy": tensor(policy_lengths)[finite], "base": tensor(base_lengths)[finite]}
    delta = lengths["policy"] - lengths["base"]
    preference = torch.sigmoid(policy - base)
    n = len(preference)
    result = {"prompts": n, "non_finite": len(finite) - n,
              "wins": int((policy > base).sum()), "ties": int((policy == base).sum()),
              "win_rate": preference.mean().item() if n else None,
              "win_rate_se": (preference.std() / math.sqrt(n)).item() if n > 1 else None,
              "lc_win_rate": None, "lc_win_rate_se": None, "length_coefficient": None,
              "length_term": n >= MIN_PROMPTS and delta.std().item() > 0}
    if n >= MIN_PROMPTS:
        lc, se, phi = (value.item() for value in length_controlled(preference[None], delta[None]))
        result |= {"lc_win_rate": lc, "lc_win_rate_se": se, "length_coefficient": phi}
    return result | {f"length/{name}": values.mean().item() if n else None
                     for name, values in lengths.items()}


def judge_samples(args, samples, split, device, dtype):
    """eval.py --judge: the rewards of the policy's and the base's answer in each sample (added to
    the sample as policy_score and base_score, None when not finite, for samples.jsonl), compared
    with their lengths in characters. sample["row"] is the prompt's row in `split` of
    args.dataset: the reward model reads the prompt as messages, not as the policy's template wrote
    it. An answer both models gave to a prompt is scored once, so it is a tie."""
    pairs = preferences.read_pairs(args.dataset, split)
    model, tokenizer = load(args.judge, args.load_in_4bit, dtype, device, args.trust_remote_code)
    sides = ("policy", "base")
    # (row, text) once: batches padded to other widths could score one text a rounding error apart
    answers = list(dict.fromkeys((sample["row"], sample[name]) for name in sides
                                 for sample in samples))
    conversations = [pairs[row].prompt + [{"role": "assistant", "content": text}]
                     for row, text in answers]
    rewards = dict(zip(answers, score(model, tokenizer, conversations, args.batch_size),
                       strict=True))
    scores = {name: [rewards[sample["row"], sample[name]] for sample in samples] for name in sides}
    lengths = {name: [len(sample[name]) for sample in samples] for name in sides}
    for name in sides:
        for sample, value in zip(samples, scores[name], strict=True):
            # samples.jsonl is JSON: no NaN
            sample[f"{name}_score"] = value if math.isfinite(value) else None
    return {"reward_model": args.judge} | compare(scores["policy"], scores["base"],
                                                  lengths["policy"], lengths["base"])


if __name__ == "__main__":
    import argparse
    # a module, not a command: --help says how to use it
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("judge.py runs through eval.py --judge and onpolicy.py --reward-model: see --help")
