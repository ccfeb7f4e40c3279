"""judge.py: the win rate and AlpacaEval's length-controlled win rate on hand-written judges, and
the scores of a tiny reward model read as its own chat template and a single forward pass give
them."""
import importlib.util
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import demo
import eval as evaluate
import judge
import preferences
from cli import UsageError

REPO = Path(__file__).resolve().parent.parent

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
    # θ alone: each left-out fit is the mean of the other prompts, whose jackknife is sd/√n
    assert result["lc_win_rate_se"] == pytest.approx(result["win_rate_se"], rel=1e-9)
    assert result["length_term"] is False and result["length_coefficient"] == 0
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


def test_the_lc_standard_error_is_the_jackknife_of_the_whole_fit():
    """Each prompt left out in turn, the fit redone (Δ rescaled by the others' sd):
    se = √((n − 1)/n · Σ(LCᵢ − mean)²)."""
    policy_lengths, base_lengths = lengths(n=12, seed=3)
    rng = random.Random(3)
    policy_scores = [rng.gauss(0.5, 1) + 0.005 * n for n in policy_lengths]
    base_scores = [0.005 * n for n in base_lengths]
    result = judge.compare(policy_scores, base_scores, policy_lengths, base_lengths)
    preference = torch.sigmoid(torch.tensor(policy_scores, dtype=torch.float64)
                               - torch.tensor(base_scores, dtype=torch.float64))
    delta = torch.tensor(policy_lengths, dtype=torch.float64) - torch.tensor(base_lengths,
                                                                           dtype=torch.float64)
    left_out = []
    for i in range(12):
        keep = [j for j in range(12) if j != i]
        theta = judge.fit(preference[keep][None], delta[keep][None])[0, 0]
        left_out.append(torch.sigmoid(theta).item())
    mean = sum(left_out) / 12
    expected = math.sqrt(11 / 12 * sum((lc - mean) ** 2 for lc in left_out))
    assert result["lc_win_rate_se"] == pytest.approx(expected, rel=1e-9)
    assert result["length_term"] is True and result["length_coefficient"] > 0


def load_bench():
    spec = importlib.util.spec_from_file_location("lc_se", REPO / "bench" / "lc_se.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("scenario", ["even, independent lengths", "better, longer policy",
                                      "decisive judge, log-normal lengths"])
def test_the_lc_standard_error_is_the_estimates_spread_at_the_fewest_prompts(scenario):
    """bench/lc_se.py's simulation, smaller: judges that ignore length, judge.MIN_PROMPTS prompts;
    the mean reported standard error is the standard deviation of the estimate within 20%."""
    ratio = load_bench().simulate(judge.MIN_PROMPTS, 4000, scenario)
    assert 0.8 <= ratio <= 1.2


def test_equal_scores_are_ties_not_wins_and_count_half():
    result = judge.compare([1.0, 2.0, 0.5, 3.0] * 2, [1.0, 1.0, 0.5, 4.0] * 2, [10] * 8, [10] * 8)
    assert (result["wins"], result["ties"]) == (2, 4)
    expected = (4 * 0.5 + 2 / (1 + math.exp(-1)) + 2 / (1 + math.exp(1))) / 8
    assert result["win_rate"] == pytest.approx(expected, abs=1e-12)
    lines = evaluate.describe_judge(result | {"reward_model": "rm"})
    assert "scores higher on 2, lower on 2, equal on 4" in lines
    assert ("win rate 0.500 ± 0.062 (soft: the mean of σ(r_policy − r_base); a tie counts half)"
            in lines)


def test_non_finite_scores_are_left_out_and_counted():
    policy_lengths, base_lengths = lengths(n=12, seed=4)
    rng = random.Random(4)
    policy_scores = [rng.gauss(0.3, 1) for _ in range(12)]
    base_scores = [rng.gauss(0, 1) for _ in range(12)]
    bad = {0: (math.nan, 0.0), 5: (0.0, math.inf), 7: (-math.inf, -math.inf)}
    for i, (policy_score, base_score) in bad.items():
        policy_scores[i], base_scores[i] = policy_score, base_score
    result = judge.compare(policy_scores, base_scores, policy_lengths, base_lengths)
    kept = [i for i in range(12) if i not in bad]
    expected = judge.compare(*([values[i] for i in kept] for values in
                               (policy_scores, base_scores, policy_lengths, base_lengths)))
    assert result == expected | {"non_finite": 3} and expected["non_finite"] == 0
    lines = evaluate.describe_judge(result | {"reward_model": "rm"})
    assert ("on 9 prompts (same seed for policy and base); 3 more left out: a non-finite score"
            in lines)


@pytest.mark.parametrize("n", range(judge.MIN_PROMPTS + 1))
def test_a_result_is_json_and_describe_never_prints_nan(n):
    """Below MIN_PROMPTS no LC; below 2 no win-rate standard error; at 0 no win rate."""
    policy_lengths, base_lengths = lengths(n=n, seed=n)
    result = judge.compare([0.3 * i for i in range(n)], [0.2] * n, policy_lengths, base_lengths)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert (result["lc_win_rate"] is None) == (n < judge.MIN_PROMPTS)
    assert (result["win_rate_se"] is None) == (n < 2)
    assert (result["win_rate"] is None) == (n == 0)
    lines = evaluate.describe_judge(result | {"reward_model": "rm"})
    assert "nan" not in lines
    if n < judge.MIN_PROMPTS:
        assert f"length-controlled n/a (not estimated below {judge.MIN_PROMPTS} prompts)" in lines
    everything_left_out = judge.compare([math.nan] * n, [0.0] * n, policy_lengths, base_lengths)
    assert json.dumps(everything_left_out, allow_nan=False)
    assert "nan" not in evaluate.describe_judge(everything_left_out | {"reward_model": "rm"})


def test_one_length_difference_for_every_prompt_is_no_length_term():
    rng = random.Random(5)
    policy_scores = [rng.gauss(0.3, 1) for _ in range(20)]
    result = judge.compare(policy_scores, [0.0] * 20, [130] * 20, [100] * 20)
    assert result["length_term"] is False and result["length_coefficient"] == 0
    assert result["lc_win_rate"] == pytest.approx(result["win_rate"], abs=1e-12)
    lines = evaluate.describe_judge(result | {"reward_model": "rm"})
    assert "= the win rate (no length term: every prompt has the same length difference)" in lines
    varied = judge.compare(policy_scores, [0.0] * 20, [130] * 19 + [131], [100] * 20)
    assert varied["length_term"] is True


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


# ---------------------------------------------------------------- judging eval.py's samples

# (policy's answer, base's answer) to rows 0-9 of the demo's test split
ANSWERS = [("APPLE RIVER STONE", "apple"), ("cloud tiger", "CLOUD TIGER MAPLE CANDLE"),
           ("orbit pepper", "orbit pepper"), ("SILVER HARBOR", "silver"),
           ("violet lantern meadow", "falcon"), ("copper", "ember glacier"),
           ("willow thunder velvet", "canyon"), ("puzzle rocket", "PUZZLE"),
           ("apple stone", "nan"), ("RIVER CLOUD TIGER", "maple")]


def test_judge_samples_scores_each_side_once_and_counts_characters(monkeypatch):
    """Each sample's answers are scored as its split row's prompt (messages) plus the answer, an
    answer both sides gave once; compare gets the policy's rewards and lengths in characters first.
    The scores go into the samples, None when not finite."""
    seen = []

    def fake_score(model, tokenizer, conversations, batch_size):
        # as batches padded to other widths do: the same text need not score the same float twice
        values = [math.nan if c[-1]["content"] == "nan" else len(c[-1]["content"]) / 10 + i * 1e-9
                  for i, c in enumerate(conversations, len(seen))]
        seen.extend(zip(map(json.dumps, conversations), values, strict=True))
        return values

    monkeypatch.setattr(judge, "load", lambda *args: (None, None))
    monkeypatch.setattr(judge, "score", fake_score)
    samples = [{"row": row, "policy": policy, "base": base, "policy_tokens": policy.count(" ") + 2,
                "base_tokens": base.count(" ") + 2}
               for row, (policy, base) in enumerate(ANSWERS)]
    args = SimpleNamespace(dataset=str(demo.DATA_DIR), judge="rm", load_in_4bit=False,
                           trust_remote_code=False, batch_size=4)
    result = judge.judge_samples(args, samples, "test", "cpu", torch.float32)
    prompts = [pair.prompt for pair in preferences.read_pairs(str(demo.DATA_DIR), "test")]
    rewards = dict(seen)
    assert len(rewards) == len(seen) == 19
    scores = {name: [rewards[json.dumps(prompts[row] + [{"role": "assistant", "content": answer}])]
                     for row, answer in enumerate(answers)]
              for name, answers in zip(("policy", "base"), zip(*ANSWERS, strict=True), strict=True)}
    for name in ("policy", "base"):
        assert [s[f"{name}_score"] for s in samples] == [None if math.isnan(v) else v
                                                         for v in scores[name]]
    assert result == {"reward_model": "rm"} | judge.compare(
        scores["policy"], scores["base"], [len(policy) for policy, _ in ANSWERS],
        [len(base) for _, base in ANSWERS])
    kept = [pair for pair in ANSWERS if pair[1] != "nan"]
    assert result["length/policy"] == sum(len(policy) for policy, _ in kept) / 9
    assert result["length/base"] == sum(len(base) for _, base in kept) / 9
    assert (result["ties"], result["non_finite"], result["prompts"]) == (1, 1, 9)


def test_judge_help_says_how_it_is_used():
    import subprocess
    import sys
    from pathlib import Path
    result = subprocess.run([sys.executable, "judge.py", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and "A reward model as judge" in result.stdout
