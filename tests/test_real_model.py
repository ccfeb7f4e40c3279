"""A real chat model on real pairs: SmolLM2-135M-Instruct (Llama architecture, tied embeddings,
ChatML template with a default system prompt, stops at <|im_end|>) on real UltraFeedback rows. The
model folder is $SIMPO_REAL_MODEL or the fetch script's default output; without it, or without
../shared/fixtures, these tests skip. Lengths are short and pairs few: the file runs in about a
minute and a half on 2 CPU cores."""
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tokenize_pair

import eval
import generation
import modeling
import packing
import preferences
import train

DEFAULT_MODEL = "~/.cache/simpo-fixtures/smollm2-135m-instruct"  # where the fetch script writes it
MODEL = Path(os.environ.get("SIMPO_REAL_MODEL", DEFAULT_MODEL)).expanduser()
FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
PAIRS = FIXTURES / "real-data" / "ultrafeedback_trl_eval200.jsonl"
FETCH = "../shared/fixtures/real-model/fetch-smollm2.sh"

pytestmark = [
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                       reason=f"no SmolLM2-135M-Instruct at {MODEL}: run {FETCH} "
                              f"or set SIMPO_REAL_MODEL"),
    pytest.mark.skipif(not PAIRS.is_file(), reason=f"{PAIRS} is absent"),
]

# Questions a chat model answers in a sentence: UltraFeedback's prompts mostly ask for long answers
QUESTIONS = ["What is the capital of France? Answer in one sentence.",
             "What is 2 + 2? Answer with the number only.",
             "Name one primary colour. Answer in one word.",
             "Is water wet? Answer yes or no.",
             "What colour is the sky on a clear day? Answer in one word.",
             "How many legs does a spider have? Answer with the number only.",
             "What is the opposite of hot? Answer in one word.",
             "Translate 'merci' into English. Answer in one word.",
             "What is the largest planet in the solar system? Answer in one word.",
             "Who wrote Romeo and Juliet? Answer with the name only.",
             "What is the boiling point of water in Celsius? Answer with the number only.",
             "Which animal says 'moo'? Answer in one word.",
             "What is the chemical symbol for gold? Answer with the symbol only.",
             "How many days are in a week? Answer with the number only.",
             "What language is spoken in Spain? Answer in one word.",
             "Is the Earth round? Answer yes or no."]


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer(str(MODEL))


@pytest.fixture(scope="module")
def model():
    return modeling.load_model(str(MODEL)).eval()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The first 20 real rows, as a file of their own."""
    path = tmp_path_factory.mktemp("real") / "pairs.jsonl"
    path.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:20]))
    return path


def test_packed_equals_padded_equals_the_models_own_logits(model, tokenizer, pairs_file):
    examples, _, _ = preferences.load_examples(tokenizer, str(pairs_file), "train", max_length=96,
                                        max_prompt_length=64)
    pairs = examples[:3]
    # ChatML: the prompt ends at "assistant\n", no token spans it and the response
    assert all(pair["unscored"] == [0, 0] for pair in pairs)
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        own = modeling.own_logps(model, pairs)
        packed, padded = (modeling.policy_logps(model, packing.build_batch(
            pairs, pad_id, packing.Layout(packed, 96))) for packed in (True, False))
    torch.testing.assert_close(packed, own, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded, own, atol=1e-4, rtol=0)
    assert modeling.choose_layout(model, 96)[0].packed  # packed, checked on the model itself
    chosen, rejected = modeling.pair_logps(model, pairs, pad_id, 2, packing.Layout(True, 96))
    torch.testing.assert_close(torch.cat([chosen, rejected]), own, atol=1e-4, rtol=0)


def fresh_adapter(folder):
    """A LoRA adapter as train.py starts one (B = 0), saved as a folder eval.py reads."""
    from peft import LoraConfig, get_peft_model
    base = modeling.load_model(str(MODEL))
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                    task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


def test_training_lowers_held_out_loss_and_moves_kl_from_zero(pairs_file, tmp_path, capsys):
    """3 steps of 4 real pairs at a learning rate that moves a 135M model fast: the held-out SimPO
    loss falls; KL(policy ‖ base) is exactly 0 for a fresh adapter and positive after training."""
    lengths = ["--max-length", "96", "--max-prompt-length", "64"]
    run = tmp_path / "run"
    rc = train.main(["--model", str(MODEL), "--dataset", str(pairs_file), "--eval-fraction", "0.3",
                     *lengths, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3",
                     "--lr", "2e-3", "--warmup-ratio", "0", "--lora-r", "8", "--lora-alpha", "16",
                     "--beta", "2.5", "--gamma-beta-ratio", "0.55", "--seed", "0",
                     "--output-dir", str(run)])
    assert rc == 0, capsys.readouterr().err
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held_out = [row["eval/loss"] for row in logged if "eval/loss" in row]
    assert len(held_out) == 2 and held_out[1] < held_out[0], held_out

    fresh = fresh_adapter(tmp_path / "fresh")
    # the held-out pairs as a file: eval.py scores all of a file the adapter did not train on
    config = json.loads((run / "run_config.json").read_text())
    _, scored, _ = preferences.load_examples(modeling.load_tokenizer(str(MODEL)), str(pairs_file),
                                             "train", None, config["eval_fraction"],
                                             config["seed"], 96, 64)
    rows = pairs_file.read_text().splitlines(keepends=True)
    held_out_file = tmp_path / "held-out.jsonl"
    held_out_file.write_text("".join(rows[row] for row in scored.rows))
    # the run's β and γ (the fresh adapter has no run_config.json to take them from)
    settings = [*lengths, "--beta", "2.5", "--gamma", "1.375", "--batch-size", "8"]
    for adapter in (fresh, run):
        assert eval.main(["--adapter", str(adapter), "--model", str(MODEL),
                          "--dataset", str(held_out_file), *settings,
                          "--out", str(adapter / "eval.json")]) == 0
    fresh_report = json.loads((fresh / "eval.json").read_text())
    trained_report = json.loads((run / "eval.json").read_text())
    assert fresh_report["kl/chosen"] == fresh_report["kl/rejected"] == 0.0
    assert trained_report["kl/chosen"] > 1e-3 and trained_report["kl/rejected"] > 1e-3
    # the base's numbers are the model's, whichever adapter is switched off
    assert trained_report["base"]["loss"] == pytest.approx(fresh_report["base"]["loss"], abs=1e-5)
    assert trained_report["policy"]["loss"] == pytest.approx(held_out[1], abs=1e-4)


def question_examples(tokenizer):
    """QUESTIONS as tokenized pairs (the answers are placeholders: only the prompts are sampled)."""
    return [tokenize_pair(tokenizer, [{"role": "user", "content": question}],
                               {"role": "assistant", "content": "Yes."},
                               {"role": "assistant", "content": "No."}, 256, 192)
            for question in QUESTIONS]


def test_base_samples_stop_at_im_end(model, tokenizer):
    """Sampled at temperature 1, the base answers most short questions within 64 tokens and stops
    at <|im_end|> (12 of 16 here; 10 to 15 over seeds 0 to 4)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = generation.generate_samples(model, lambda: contextlib.nullcontext(model), tokenizer,
                                          question_examples(tokenizer), len(QUESTIONS), 64, seed=0,
                                          sides=("base",))
    ended = [sample for sample in samples if sample["base_ended"]]
    assert len(ended) > len(samples) / 2, [sample["base"] for sample in samples]
    assert all(sample["base_ids"][-1] == im_end for sample in ended)
    assert all(sample["base_tokens"] == 64 for sample in samples if not sample["base_ended"])
    assert generation.health(samples, "base")["health/base/ended"] == len(ended) / len(samples)


def test_generation_prompt_is_the_prompt_train_scored_with_the_system_prompt(model, tokenizer):
    """The ids train.py scores a response after (preferences.load_examples, as train.py calls it)
    are the template's generation prompt, SmolLM2's default system turn included, and
    generate_samples samples after exactly those ids."""
    examples, _, _ = preferences.load_examples(tokenizer, str(PAIRS), "train", max_length=4096,
                                        max_prompt_length=4096)
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    for example, row in zip(examples[:], (rows[i] for i in examples.rows), strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(preferences.generation_prompt(example)) == text
        assert preferences.generation_prompt(example) == example["prompt"]
    samples = generation.generate_samples(model, lambda: contextlib.nullcontext(model), tokenizer,
                                          examples, 2, 1, sides=("base",))
    by_row = {int(row): examples[i] for i, row in enumerate(examples.rows)}
    for sample in samples:
        assert sample["prompt"] == tokenizer.decode(by_row[sample["row"]]["prompt"])
