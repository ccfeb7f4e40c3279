"""judge.py: the win rate and AlpacaEval's length-controlled win rate on hand-written judges, and
the scores of a tiny reward model read as its own chat template and a single forward pass give
them."""
import math
import random

import pytest
import torch

import demo
import judge
from checkpoints import UsageError

# The reward model's own template, unlike the SFT model's (demo.CHAT_TEMPLATE): no end-of-turn
# tokens, one EOS at the end
REWARD_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                   "{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}{{ eos_token }}")


def build_reward_model(folder, hidden_size=16, seed=1):
    """A random LlamaForSequenceClassification with one output, with the demo's word tokenizer and a
    chat template of its own, saved as an ordinary model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    demo.build_tiny_model(folder, hidden_size=hidden_size)  # for its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = REWARD_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def lengths(n=200, seed=0):
    """Answer lengths in characters: the policy's longer than the base's on about two prompts in
    three."""
    rng = random.Random(seed)
    base = [rng.randint(50, 500) for _ in range(n)]
    return [b + rng.randint(-150, 300) for b in base], base


# ---------------------------------------------------------------- statistics

def test_a_judge_of_length_alone_wins_often_but_not_length_controlled():
    policy_lengths, base_lengths = lengths()
    # a judge that likes every character a little: σ(0.02·Δ)
    result = judge.compare([0.02 * n for n in policy_lengths], [0.02 * n for n in base_lengths],
                           policy_lengths, base_lengths)
    assert result["win_rate"] > 0.6 and result["wins"] > 120
    # not exactly 0.5: tanh(Δ/sd) is not the judge's own linear Δ
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=0.03)
    assert result["length_coefficient"] > 1
    assert result["length/policy"] > result["length/base"]


def test_equal_lengths_give_the_win_rate_itself():
    rng = random.Random(1)
    policy_scores = [rng.gauss(0.3, 1) for _ in range(50)]
    base_scores = [rng.gauss(0, 1) for _ in range(50)]
    result = judge.compare(policy_scores, base_scores, [120] * 50, [120] * 50)
    preference = [1 / (1 + math.exp(b - p))
                  for p, b in zip(policy_scores, base_scores, strict=True)]
    mean = sum(preference) / 50
    sd = math.sqrt(sum((x - mean) ** 2 for x in preference) / 49)
    assert result["win_rate"] == pytest.approx(mean, abs=1e-12)
    assert result["lc_win_rate"] == pytest.approx(mean, abs=1e-12)
    assert result["win_rate_se"] == pytest.approx(sd / math.sqrt(50), rel=1e-9)
    # intercept only: the sandwich variance is Σ(p − p̄)² / n², i.e. sd·√((n − 1)/n)/√n
    assert result["lc_win_rate_se"] == pytest.approx(sd * math.sqrt(49 / 50) / math.sqrt(50),
                                                     rel=1e-6)
    assert result["wins"] == sum(p > b for p, b in zip(policy_scores, base_scores, strict=True))


def test_the_fit_is_the_penalised_maximum_likelihood():
    """A judge that likes the policy (+0.5) and length: the gradient of the penalised log-likelihood
    is zero at the reported θ = logit(LC) and φ, and LC lies between 0.5 and the raw win rate."""
    policy_lengths, base_lengths = lengths(seed=2)
    policy_scores = [0.5 + 0.01 * n for n in policy_lengths]
    base_scores = [0.01 * n for n in base_lengths]
    result = judge.compare(policy_scores, base_scores, policy_lengths, base_lengths)
    lc = result["lc_win_rate"]
    weights = torch.tensor([math.log(lc / (1 - lc)), result["length_coefficient"]],
                           dtype=torch.float64, requires_grad=True)
    preference = torch.sigmoid(torch.tensor(policy_scores, dtype=torch.float64)
                               - torch.tensor(base_scores, dtype=torch.float64))
    delta = torch.tensor(policy_lengths, dtype=torch.float64) - torch.tensor(base_lengths,
                                                                           dtype=torch.float64)
    logits = weights[0] + weights[1] * torch.tanh(delta / delta.std())
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, preference, reduction="sum")
    (loss + judge.RIDGE * weights[1] ** 2 / 2).backward()
    assert weights.grad.abs().max() < 1e-8
    assert 0.5 < lc < result["win_rate"]
    assert 0 < result["lc_win_rate_se"] < 0.05


def test_one_model_winning_every_prompt_outright():
    policy_lengths, base_lengths = lengths(n=20)
    result = judge.compare([1e3] * 20, [0.0] * 20, policy_lengths, base_lengths)
    assert result["win_rate"] == result["lc_win_rate"] == 1.0 and result["wins"] == 20


# ---------------------------------------------------------------- the reward model

@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = build_reward_model(tmp_path_factory.mktemp("judge") / "rm")
    return judge.load(folder)


CONVERSATIONS = [[{"role": "user", "content": "shout: apple"},
                  {"role": "assistant", "content": answer}]
                 for answer in ("APPLE", "apple river stone", "tiger", "MAPLE CANDLE ORBIT PEPPER")]


def test_scores_come_from_the_reward_models_template_and_do_not_depend_on_padding(reward_model):
    model, tokenizer = reward_model
    expected = []
    for conversation in CONVERSATIONS:  # one unpadded forward each, the template as text
        text = ("<|bos|> " + " ".join(f"<|{m['role']}|> {m['content']}" for m in conversation)
                + " <|end|>")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.apply_chat_template(conversation)["input_ids"]
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert len(set(expected)) == len(expected)
    for batch_size in (1, 3, 4):
        assert judge.score(model, tokenizer, CONVERSATIONS, batch_size) == pytest.approx(expected,
                                                                                        abs=1e-5)
    model.config.pad_token_id = None  # the classifier then reads the last token: one at a time
    try:
        assert judge.score(model, tokenizer, CONVERSATIONS, 4) == pytest.approx(expected, abs=1e-5)
    finally:
        model.config.pad_token_id = tokenizer.pad_token_id
    assert judge.score(model, tokenizer, [], 4) == []


def test_load_refuses_what_is_not_a_reward_model(tmp_path):
    sft = demo.build_tiny_model(tmp_path / "sft", hidden_size=16)
    with pytest.raises(UsageError, match="--reward-model .*sft is not a reward model"):
        judge.load(sft, flag="--reward-model")
    with pytest.raises(UsageError, match="--judge .*no-such-model"):
        judge.load(str(tmp_path / "no-such-model"))
