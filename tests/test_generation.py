"""generation.py: health measures on hand-made samples with known values, the degeneration rule at
its thresholds, sampling on a tiny model (stop tokens, log-ratios against float64 full logits), and
SampleMonitor rounds that leave RNG states, module modes and training exactly as they were."""
import contextlib
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import tokenize_pair
from test_generation_prompt import CHATML, char_tokenizer

import demo
import generation
import modeling
import preferences

STOP = 2


def side(ids, ended, text):
    return {"policy_ids": ids, "policy_ended": ended, "policy_tokens": len(ids), "policy": text}


# one token repeated; a limit hit; an empty answer; a normal one
HAND_MADE = [side([5] * 6 + [STOP], True, "hi hi hi hi hi hi"),
             side([1, 2, 3, 4, 5, 6, 7, 8], False, "a b c d e f g h"),
             side([STOP], True, ""),
             side([9, 10, 11, 12, 13, STOP], True, "The sky is blue.")]


def test_health_of_hand_made_samples():
    health = generation.health(HAND_MADE, "policy")
    # answer lengths 6, 8, 0, 5 (the stop token is not answer)
    assert health["health/policy/length"] == 19 / 4
    deviations = [6 - 19 / 4, 8 - 19 / 4, 0 - 19 / 4, 5 - 19 / 4]
    assert health["health/policy/length_se"] == pytest.approx(
        math.sqrt(sum(d * d for d in deviations) / 3) / 2)
    assert health["health/policy/ended"] == 0.75
    assert health["health/policy/cut"] == 0.25
    assert health["health/policy/empty"] == 0.25
    # seq-rep-4 of the answers with a 4-gram: 1 - 1/3 (three 4-grams, all one), 0, 0; the empty one
    # has none
    assert health["health/policy/rep4"] == pytest.approx(2 / 9)
    assert health["health/policy/rep4_se"] == pytest.approx(2 / 9)
    # bigrams: 5 of (5, 5), 7 distinct, none, 4 distinct: 12 distinct of 16
    assert health["health/policy/distinct2"] == 0.75
    assert all(type(value) is float for value in health.values())


def test_repetition_counts_4_grams_and_distinct_counts_bigrams():
    """Answers whose n-gram counts differ with n: another n gives other numbers."""
    samples = [side([7, 8, 7, 8, 7, 9, STOP], True, "a b a b a c"),
               side([1, 1, 1, 1, 1], False, "d d d d d")]
    health = generation.health(samples, "policy")
    # 4-grams: 3 distinct of 3 (3-grams: 3 of 4), and 1 of 2 (3-grams: 1 of 3)
    assert health["health/policy/rep4"] == 0.25
    assert health["health/policy/rep4_se"] == pytest.approx(0.25)
    # bigrams: (7, 8), (8, 7), (7, 9) of 5, and (1, 1) of 4 (trigrams: 4 distinct of 7)
    assert health["health/policy/distinct2"] == 4 / 9


def test_health_counts_whitespace_as_empty_and_reads_the_named_side():
    samples = [{"base_ids": [7, STOP], "base_ended": True, "base": " \n"}]
    health = generation.health(samples, "base")
    assert health["health/base/empty"] == 1.0 and health["health/base/length"] == 1.0
    # no 4-gram, no bigram
    assert health["health/base/rep4"] == health["health/base/distinct2"] == 0.0
    assert health["health/base/length_se"] == 0.0  # one value estimates no spread


def test_kl_sequence_is_the_mean_log_ratio_with_its_standard_error():
    samples = [{"log_ratio": 1.0, "policy_tokens": 3}, {"log_ratio": 3.0, "policy_tokens": 5}]
    assert generation.kl_sequence(samples) == {"kl/sequence": 2.0,
                                               "kl/sequence_se": pytest.approx(1.0),
                                               "kl/sequence_per_token": 0.5}


def base_like(policy):
    """The same health under the base's keys."""
    return {key.replace("/policy/", "/base/"): value for key, value in policy.items()}


def test_degeneration_fires_on_a_planted_collapse_and_not_on_a_healthy_set():
    healthy = generation.health(HAND_MADE, "policy")
    assert generation.degeneration(healthy, base_like(healthy)) is None
    collapsed = [side([5] * 8, False, "hi " * 8) for _ in range(4)]
    line = generation.degeneration(generation.health(collapsed, "policy"), base_like(healthy))
    assert line.startswith("warning: the policy's samples degenerate")
    assert "repetition" in line and "do not end" in line
    assert "length" not in line and "empty" not in line  # 8 tokens: within twice the base's 4.75


@pytest.mark.parametrize("key, inside, outside, word", [
    ("rep4", 0.29, 0.31, "repetition"),     # base 0.1, limit +0.2
    ("ended", 0.61, 0.59, "do not end"),    # base 0.9, limit -0.3
    ("empty", 0.29, 0.31, "empty"),         # base 0.1, limit +0.2
    ("length", 20.0, 19.9, "length"),       # base 40, limit / 2
    ("length", 80.0, 80.1, "length"),       # base 40, limit × 2
])
def test_degeneration_thresholds(key, inside, outside, word):
    base = {"health/base/rep4": 0.1, "health/base/ended": 0.9, "health/base/empty": 0.1,
            "health/base/length": 40.0}
    policy = {key.replace("/base/", "/policy/"): value for key, value in base.items()}
    assert generation.degeneration(policy | {f"health/policy/{key}": inside}, base) is None
    line = generation.degeneration(policy | {f"health/policy/{key}": outside}, base)
    assert word in line and line.count(";") == 0


@pytest.mark.parametrize("base_length", [0.0, 0.5])
def test_degeneration_counts_a_base_under_one_token_as_one(base_length):
    base = {"health/base/rep4": 0.0, "health/base/ended": 1.0, "health/base/empty": 1.0,
            "health/base/length": base_length}
    policy = {key.replace("/base/", "/policy/"): value for key, value in base.items()}
    assert generation.degeneration(policy | {"health/policy/length": 1.5}, base) is None
    line = generation.degeneration(policy | {"health/policy/length": 2.5}, base)
    assert f"length (2.5 tokens, outside base {base_length:.1f} ÷ or × 2)" in line


def test_degeneration_on_kl_per_sampled_token():
    healthy = generation.health(HAND_MADE, "policy")
    base = base_like(healthy)
    assert generation.degeneration(healthy, base, {"kl/sequence_per_token": 0.09}) is None
    line = generation.degeneration(healthy, base, {"kl/sequence_per_token": 0.11})
    assert "far from the base (KL 0.11 > 0.1 nats per sampled token)" in line


# ---------------------------------------------------------------- on a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model's folder, its tokenizer and 16 demo pairs."""
    folder = tmp_path_factory.mktemp("generation")
    model_dir = demo.build_tiny_model(folder / "model", hidden_size=32)
    tokenizer = modeling.load_tokenizer(model_dir)
    lines = (demo.DATA_DIR / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:16]]
    examples = [tokenize_pair(tokenizer, [{"role": "user", "content": row["prompt"]}],
                                   {"role": "assistant", "content": row["chosen"]},
                                   {"role": "assistant", "content": row["rejected"]}, 64, 32)
                for row in rows]
    return model_dir, tokenizer, examples


def fresh_policy(model_dir, seed=0):
    """The tiny model with LoRA (lora_dropout on: training draws random numbers)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    model = get_peft_model(modeling.load_model(model_dir), lora)
    # B = 0 in a fresh adapter: a nonzero B makes policy and base differ
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    return model


def full_logps(model, prompt, answer):
    """Float64 sum of the answer's log-probs from the model's full logits, unpadded."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    rows = logits[len(prompt) - 1:-1].log_softmax(-1)
    return rows.gather(1, torch.tensor(answer)[:, None]).sum().item()


def test_samples_stop_at_the_stop_token_and_log_ratios_match_full_logits(tiny):
    model_dir, tokenizer, examples = tiny
    policy = fresh_policy(model_dir).eval()
    config = policy.generation_config
    stop = tokenizer.eos_token_id
    samples = generation.generate_samples(policy, lambda: generation.without_adapter(policy),
                                          tokenizer, examples, 8, 6, seed=3, batch_size=3)
    assert policy.generation_config is config  # restored
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(3))[:8].tolist()
    assert [s["row"] for s in samples] == order
    for sample, i in zip(samples, order, strict=True):
        assert sample["prompt"] == tokenizer.decode(preferences.generation_prompt(examples[i]))
        for name in ("policy", "base"):
            ids = sample[f"{name}_ids"]
            assert sample[f"{name}_tokens"] == len(ids)
            assert sample[f"{name}_ended"] == (stop in ids)
            if stop in ids:
                assert ids.index(stop) == len(ids) - 1
            else:
                assert len(ids) == 6
        prompt = preferences.generation_prompt(examples[i])
        expected = full_logps(policy, prompt, sample["policy_ids"])
        with policy.disable_adapter():
            expected -= full_logps(policy, prompt, sample["policy_ids"])
        assert sample["log_ratio"] == pytest.approx(expected, abs=1e-4)
    ended = [s[f"{name}_ended"] for s in samples for name in ("policy", "base")]
    assert any(ended) and not all(ended)  # both branches met (seed chosen so)
    assert any(s["policy_ids"] != s["base_ids"] for s in samples)


def test_stop_tokens_are_eos_generation_configs_and_the_end_of_turn():
    tokenizer = char_tokenizer(CHATML, eos_token="</s>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[4, 0]))
    _, stop = generation.sampling_config(model, tokenizer, 1.0, 1.0, 16)
    assert stop == sorted([0, 4, *tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"])])


def test_samples_stop_at_the_templates_end_of_turn_where_eos_differs(tmp_path):
    """A chat model made from a base: its EOS and generation_config.json say <|endoftext|>, its
    template ends a turn with <|im_end|>, made likely here (p ≈ 0.6 a token): every sample ends
    there, not in invented turns after it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = char_tokenizer(CHATML, eos_token="<|endoftext|>")
    eos, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == eos
    model = modeling.load_model(str(tmp_path)).eval()
    tokenizer = modeling.load_tokenizer(str(tmp_path))
    assert generation.sampling_config(model, tokenizer, 1.0, 1.0, 16)[1] == sorted([eos, im_end])
    bias = torch.zeros(len(tokenizer))
    bias[im_end] = 5.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    prompts = [[{"role": "user", "content": f"Count to {n}."}] for n in range(6)]
    pairs = [preferences.Pair(prompt, None, None, True, "row") for prompt in prompts]
    examples = [{"prompt": ids, "prompt_end": [0]}
                for ids in preferences.generation_prompt_ids(tokenizer, pairs)]
    samples = generation.generate_samples(model, lambda: contextlib.nullcontext(model), tokenizer,
                                          examples, 6, 16, seed=0, sides=("base",))
    assert all(sample["base_ended"] and sample["base_ids"][-1] == im_end for sample in samples)
    assert max(sample["base_tokens"] for sample in samples) > 1  # some text before it


def monitor_for(tiny, model, out_dir, seed=1):
    model_dir, tokenizer, examples = tiny
    return generation.SampleMonitor(model, tokenizer, examples, 6, 8, seed, out_dir)


def test_a_round_restores_rng_states_and_module_modes(tiny, tmp_path):
    model = fresh_policy(tiny[0]).train()
    # as modeling.prepare_model does: in train mode, checkpointing turns off the KV cache
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    frozen = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
    frozen.eval()  # a module left in eval mode stays so
    modes = [module.training for module in model.modules()]
    monitor = monitor_for(tiny, model, tmp_path)
    torch.manual_seed(123)
    cpu_state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(cpu_state)
    python_state = random.getstate()

    base = monitor.base()
    metrics, warning = monitor.round(7)

    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.rand(4), expected)
    # nothing to restore there: sampling draws nothing from Python's random
    assert random.getstate() == python_state
    assert [module.training for module in model.modules()] == modes
    names = ("length", "length_se", "ended", "cut", "empty", "rep4", "rep4_se", "distinct2")
    assert set(base) == {f"health/base/{name}" for name in names}
    policy = {key for key in metrics if key.startswith("health/")}
    assert policy == {f"health/policy/{name}" for name in names}
    assert metrics["sample/seconds"] >= 0 and "kl/sequence_se" in metrics
    assert warning is None or warning.startswith("step 7: warning:")
    lines = (tmp_path / "samples-step-7.jsonl").read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        assert {"policy", "base", "policy_ids", "base_ids", "log_ratio"} <= set(json.loads(line))


def test_a_round_samples_in_eval_mode_whatever_the_mode_it_is_called_in(tiny, tmp_path):
    """LoRA dropout acts in train mode only: a round from training samples as one from eval."""
    model = fresh_policy(tiny[0]).train()
    monitor_for(tiny, model, tmp_path / "train").round(1)
    model.eval()
    monitor_for(tiny, model, tmp_path / "eval").round(1)
    text = (tmp_path / "train" / "samples-step-1.jsonl").read_text()
    assert text == (tmp_path / "eval" / "samples-step-1.jsonl").read_text()


def test_rounds_are_deterministic_for_a_seed(tiny, tmp_path):
    model = fresh_policy(tiny[0]).train()
    first = monitor_for(tiny, model, tmp_path / "a")
    first.round(1)
    first.round(2)
    torch.manual_seed(999)  # the training's RNG does not matter
    monitor_for(tiny, model, tmp_path / "b").round(1)
    other_seed = monitor_for(tiny, model, tmp_path / "c", seed=2)
    other_seed.round(1)
    text = (tmp_path / "a" / "samples-step-1.jsonl").read_text()
    assert text == (tmp_path / "a" / "samples-step-2.jsonl").read_text()
    assert text == (tmp_path / "b" / "samples-step-1.jsonl").read_text()
    assert text != (tmp_path / "c" / "samples-step-1.jsonl").read_text()


def train_a_few_steps(tiny, monitor_dir=None):
    """Three AdamW steps on a loss that goes through LoRA dropout; a sampling round before each step
    when `monitor_dir` is given. Returns the trained LoRA weights."""
    model_dir, tokenizer, examples = tiny
    model = fresh_policy(model_dir, seed=4).train()
    monitor = monitor_for(tiny, model, monitor_dir) if monitor_dir else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(11)
    random.seed(11)
    for step in range(3):
        if monitor:
            monitor.round(step)
        pair = examples[random.randrange(len(examples))]
        logits = model(input_ids=torch.tensor([pair["prompt"] + pair["chosen"]])).logits
        logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_training_is_bit_identical_with_and_without_rounds(tiny, tmp_path):
    without = train_a_few_steps(tiny)
    with_rounds = train_a_few_steps(tiny, tmp_path)
    assert (tmp_path / "samples-step-2.jsonl").is_file()
    assert without.keys() == with_rounds.keys()
    assert all(torch.equal(without[name], with_rounds[name]) for name in without)
