"""A reward model as judge: it scores onpolicy.py's answers and compares policy and base (eval.py).

    python eval.py --adapter runs/llama3 --generate 256 \
        --judge RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code

The reward model is an `AutoModelForSequenceClassification` with one output per conversation. A
model with its own output type (ArmoRM's `output.score`) runs its code only with
--trust-remote-code. Each conversation is rendered with the reward model's own chat template.

`compare` takes the rewards of the policy's and the base's answers to the same n prompts:
- win rate: the mean over prompts of σ(r_policy − r_base), the probability that the judge prefers
  the policy's answer (Bradley–Terry), with its standard error sd/√n; `wins` counts the prompts
  where r_policy > r_base.
- length-controlled win rate: AlpacaEval 2's GLM (Dubois et al. 2024) with the length term only. Fit
      logit P(policy preferred) = θ + φ·tanh(Δ / sd(Δ)),  Δ = len(policy answer) − len(base answer)
  with lengths in characters and sd(Δ) not centred, so Δ = 0 still means equal lengths. The fit is
  maximum likelihood on the soft preferences σ(r_policy − r_base) plus a ridge penalty 0.01·φ²/2 on
  φ alone (AlpacaEval: L1), which keeps φ finite when length alone decides every preference. The
  prediction at Δ = 0 is σ(θ). Its standard error is σ(θ)(1 − σ(θ))·se(θ) (delta method), with
  se(θ) from the sandwich estimator, which holds for soft labels. With equal lengths the fit is θ
  alone and LC equals the win rate.
  AlpacaEval's own GLM also has an instruction-difficulty term, fitted on its 805 instructions
  across many models, and its judge is GPT-4: these numbers are not comparable with its leaderboard.
"""
import torch
from jinja2 import TemplateError

import modeling
import preferences
from checkpoints import UsageError

# on φ only: an unpenalised θ makes LC equal the win rate when all lengths are equal
RIDGE = 1e-2


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
    for i in range(0, len(rows), size):
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


def compare(policy_scores, base_scores, policy_lengths, base_lengths):
    """Win rate and length-controlled win rate of the policy over the base (module docstring)."""
    def tensor(values):
        return torch.as_tensor(values, dtype=torch.float64)

    preference = torch.sigmoid(tensor(policy_scores) - tensor(base_scores))
    delta = tensor(policy_lengths) - tensor(base_lengths)
    n = len(preference)
    spread = delta.std() if n > 1 else 0.0
    length = torch.tanh(delta / spread) if spread > 0 else torch.zeros(n, dtype=torch.float64)
    # columns: θ, φ
    features = torch.stack([torch.ones_like(length), length], 1)
    penalty = tensor([0.0, RIDGE])
    weights = tensor([0.0, 0.0])
    # Newton's method: a concave log-likelihood in two parameters
    for _ in range(100):
        fitted = torch.sigmoid(features @ weights)
        gradient = features.T @ (fitted - preference) + penalty * weights
        hessian = features.T @ (features * (fitted * (1 - fitted))[:, None]) + torch.diag(penalty)
        # pinv: when one model wins every prompt outright, σ(θ) reaches 1.0 and θ's curvature 0
        step = torch.linalg.pinv(hessian) @ gradient
        weights -= step
        if step.abs().max() < 1e-12:
            break
    residuals = features * (torch.sigmoid(features @ weights) - preference)[:, None]
    bread = torch.linalg.pinv(hessian)
    theta_variance = (bread @ residuals.T @ residuals @ bread)[0, 0]
    controlled = torch.sigmoid(weights[0])
    return {"prompts": n,
            "wins": int((preference > 0.5).sum()),
            "win_rate": preference.mean().item(),
            "win_rate_se": (preference.std() / n ** 0.5).item() if n > 1 else float("nan"),
            "lc_win_rate": controlled.item(),
            "lc_win_rate_se": (controlled * (1 - controlled) * theta_variance.sqrt()).item(),
            "length_coefficient": weights[1].item(),
            "length/policy": tensor(policy_lengths).mean().item(),
            "length/base": tensor(base_lengths).mean().item()}


def judge_samples(args, samples, split, device, dtype):
    """eval.py --judge: the rewards of the policy's and the base's answer in each sample (added to
    the sample, for samples.jsonl), compared. sample["row"] is the prompt's row in `split` of
    args.dataset: the reward model reads the prompt as messages, not as the policy's template wrote
    it."""
    pairs = preferences.read_pairs(args.dataset, split)
    model, tokenizer = load(args.judge, args.load_in_4bit, dtype, device, args.trust_remote_code)
    conversations = [pairs[sample["row"]].prompt + [{"role": "assistant", "content": sample[name]}]
                     # [policy..., base...]
                     for name in ("policy", "base") for sample in samples]
    scores = score(model, tokenizer, conversations, args.batch_size)
    policy_scores, base_scores = scores[:len(samples)], scores[len(samples):]
    for sample, policy_score, base_score in zip(samples, policy_scores, base_scores, strict=True):
        sample |= {"policy_score": policy_score, "base_score": base_score}
    lengths = [[len(sample[name]) for sample in samples] for name in ("policy", "base")]
    return {"reward_model": args.judge} | compare(policy_scores, base_scores, *lengths)


def describe(result):
    """eval.py's lines for the judge."""
    return (f"judged by {result['reward_model']} on {result['prompts']} prompts (same seed for "
            f"policy and base): the policy wins {result['wins']}\n"
            f"  win rate {result['win_rate']:.3f} ± {result['win_rate_se']:.3f}, length-controlled "
            f"{result['lc_win_rate']:.3f} ± {result['lc_win_rate_se']:.3f}; mean characters: "
            f"policy {result['length/policy']:.0f}, base {result['length/base']:.0f}")
