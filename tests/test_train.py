"""End-to-end tests of train.py (and the preferences.py path it drives) on a tiny locally built
Llama model.

Everything runs in-process through `train.main([...])` (exit code 0, or 2 with a one-line `error:
...` on stderr), on CPU, with a 2-layer hidden-32 model, 8-16 pairs and 1-4 steps. Every run writes
under tmp_path.
"""
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import tokenize_pair
from safetensors.torch import load_file
from test_packing import randomise_lora_b

import demo
import modeling
import packing
import preferences
import train

REPO = Path(__file__).resolve().parent.parent
# one-line message builders, kept side by side as lambdas (hence the noqa)
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731
METRIC_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "lr",
               "tokens_per_s"}


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model + word-level tokenizer with a chat template (every demo word, in both
    cases)."""
    return demo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", words=demo.WORDS,
                                 hidden_size=32)


@pytest.fixture(scope="module")
def model_without_template(model_dir, tmp_path_factory):
    """The same model folder with its chat template removed, wherever the tokenizer keeps it."""
    folder = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    assert modeling.load_tokenizer(str(folder)).chat_template is None
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return modeling.load_tokenizer(model_dir)


def standard_rows(n=8, seed=0, max_words=5):
    """Toy shout/whisper pairs of varying lengths (so batches need padding), built from vocabulary
    words."""
    rng = random.Random(seed)
    return demo.make_pairs([rng.sample(demo.WORDS, rng.randint(1, max_words)) for _ in range(n)],
                           rng)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(argv, capsys):
    """train.main in-process: (exit code, stdout, stderr)."""
    code = train.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small_args(model, dataset, out, *extra):
    return ["--model", model, "--dataset", dataset, "--output-dir", out,
            "--max-length", 32, "--max-prompt-length", 16,
            "--batch-size", 4, "--micro-batch-size", 2, "--lora-r", 4, "--lora-alpha", 8, *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_rows(out):
    return [row for row in metrics(out) if "loss" in row]


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def assert_adapters_close(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def adapters_differ(a, b, atol):
    return any(not torch.allclose(a[name], b[name], atol=atol, rtol=0) for name in a)


def error_line(err):
    """The single `error: ...` line on stderr (tqdm bars and warnings may be around it); no
    traceback."""
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert err.count("error:") == 1, err
    return lines[0]


def template_ids(tokenizer, conversation, **kwargs):
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


# ---------------------------------------------------------------- 1. standard format, end to end

def test_standard_format_end_to_end(model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    code, stdout, err = run(small_args(model_dir, dataset, out, "--max-steps", 2, "--beta", 3,
                                       "--gamma", 0.7, "--lr", 1e-3), capsys)
    assert code == 0, err
    assert "8 training pairs, 0 held-out, 0 skipped" in stdout

    for name in ("adapter_config.json", "adapter_model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "run_config.json", "metrics.jsonl", "curves.png", "training_state.pt"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((out / "run_config.json").read_text())
    assert ((config["beta"], config["gamma"], config["max_steps"], config["lora_r"])
            == (3.0, 0.7, 2, 4))
    assert config["model"] == model_dir and config["dataset"] == dataset

    rows = metrics(out)
    assert [row["step"] for row in rows] == [1, 2]  # one line per step, no held-out set
    for row in rows:
        assert METRIC_KEYS <= row.keys()
        assert all(math.isfinite(row[k]) for k in METRIC_KEYS)
        assert 0 <= row["rewards/accuracies"] <= 1 and row["tokens_per_s"] > 0
        # β = 3 is applied
        assert row["rewards/chosen"] == pytest.approx(3 * row["logps/chosen"], rel=1e-5)
        assert row["rewards/margins"] == pytest.approx(
            row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)
    # the logged learning rate: 2 steps, no warm-up (⌊0.1·2⌋ = 0): the peak, then half-way down
    assert [row["lr"] for row in rows] == pytest.approx([1e-3, 5e-4], rel=1e-12)

    # the adapter is a regular peft adapter: it loads onto the base model, and training moved it off
    # zero
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(out))
    saved = adapter(out)
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and any(saved[name].abs().max() > 0 for name in lora_b)
    loaded = {n.replace(".default", ""): p.detach()
              for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert_adapters_close(loaded, saved, atol=0)  # every saved tensor really reached the model
    # the tokenizer saved with the run, chat template included
    tokenizer = modeling.load_tokenizer(str(out))
    assert tokenizer.chat_template == demo.CHAT_TEMPLATE
    ids = torch.tensor([template_ids(tokenizer, [U("shout: apple"), A("APPLE")])])
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert not torch.allclose(with_adapter, without)


# ---------------------------------------------------------------- 2. conversational layouts

def ultrafeedback_rows():
    """HuggingFaceH4/ultrafeedback_binarized: prompt string + full [user, assistant]
    conversations."""
    rows = []
    for i, pair in enumerate(standard_rows(8, seed=1)):
        rows.append({"prompt": pair["prompt"], "prompt_id": f"id{i}",
                     "chosen": [U(pair["prompt"]), A(pair["chosen"])],
                     "rejected": [U(pair["prompt"]), A(pair["rejected"])],
                     "messages": [U(pair["prompt"]), A(pair["chosen"])],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def trl_rows():
    """TRL conversational: prompt as a message list, chosen / rejected as [assistant] only."""
    return [{"prompt": [U(p["prompt"])], "chosen": [A(p["chosen"])], "rejected": [A(p["rejected"])]}
            for p in standard_rows(8, seed=2)]


def no_prompt_rows():
    """No prompt column: the conversations carry the prompt turns (here with a system turn, and
    multi-turn)."""
    rows = []
    for i, p in enumerate(standard_rows(8, seed=3)):
        turns = ([S("tiger maple"), U(p["prompt"])] if i % 2
                 else [U("whisper: stone"), A("stone"), U(p["prompt"])])
        rows.append({"chosen": turns + [A(p["chosen"])], "rejected": turns + [A(p["rejected"])]})
    return rows


def write_layout(layout, folder):
    if layout == "ultrafeedback.parquet":
        from datasets import Dataset
        path = folder / "ultrafeedback.parquet"
        Dataset.from_list(ultrafeedback_rows()).to_parquet(str(path))
        return str(path), ultrafeedback_rows()
    if layout == "ultrafeedback.json":
        path = folder / "ultrafeedback.json"
        path.write_text(json.dumps(ultrafeedback_rows()))
        return str(path), ultrafeedback_rows()
    rows = trl_rows() if layout == "trl.jsonl" else no_prompt_rows()
    return write_jsonl(folder / layout, rows), rows


def expected_conversations(row):
    """(prompt turns, chosen turn, rejected turn) as the layout means them."""
    if isinstance(row.get("prompt"), list):
        return row["prompt"], row["chosen"][-1], row["rejected"][-1]
    return row["chosen"][:-1], row["chosen"][-1], row["rejected"][-1]


@pytest.mark.parametrize("layout", ["ultrafeedback.parquet", "ultrafeedback.json",
                                    "trl.jsonl", "no-prompt.jsonl"])
def test_conversational_layout_matches_chat_template(layout, tokenizer, tmp_path):
    dataset, rows = write_layout(layout, tmp_path)
    pairs = preferences.read_pairs(dataset, "train")
    assert len(pairs) == len(rows)
    for (prompt, chosen, rejected, conversational, _), row in zip(pairs, rows, strict=True):
        assert conversational
        assert (prompt, chosen, rejected) == expected_conversations(row)

    examples, held_out, summary = preferences.load_examples(tokenizer, dataset, "train",
                                                     max_length=128, max_prompt_length=96)
    assert (len(examples), len(held_out), summary.skipped("train")) == (len(rows), 0, 0)
    bos = tokenizer.bos_token_id
    for example, row in zip(examples, rows, strict=True):
        prompt, chosen, rejected = expected_conversations(row)
        # prompt ids + response ids are exactly the template applied to the whole conversation,
        # tokenized
        assert example["prompt"] + example["chosen"] == template_ids(tokenizer, prompt + [chosen])
        assert (example["prompt"] + example["rejected"]
                == template_ids(tokenizer, prompt + [rejected]))
        # the prompt is the template with its generation prompt ("<|assistant|>"):
        # the response starts after it
        assert example["prompt"] == template_ids(tokenizer, prompt, add_generation_prompt=True)
        # responses end on EOS
        assert example["chosen"][-1] == example["rejected"][-1] == tokenizer.eos_token_id
        sequence = example["prompt"] + example["chosen"]
        assert sequence[0] == bos and sequence.count(bos) == 1  # exactly one BOS: no double BOS

    batch = packing.padded_rows(examples[:3], tokenizer.pad_token_id)
    n = 3
    assert batch["input_ids"].shape[0] == 2 * n
    for i, example in enumerate(examples[:3]):
        for row, side in ((i, "chosen"), (n + i, "rejected")):  # [chosen..., rejected...]
            p, r = len(example["prompt"]), len(example[side])
            assert batch["input_ids"][row, :p + r].tolist() == example["prompt"] + example[side]
            assert (batch["labels"][row, :p] == packing.IGNORE_INDEX).all()  # prompt is not scored
            assert batch["labels"][row, p:p + r].tolist() == example[side]
            assert (batch["labels"][row, p + r:] == packing.IGNORE_INDEX).all()  # nor is padding
            assert (batch["input_ids"][row, p + r:] == tokenizer.pad_token_id).all()
            assert (batch["attention_mask"][row].tolist()
                    == [1] * (p + r) + [0] * (batch["input_ids"].shape[1] - p - r))


@pytest.mark.parametrize("layout", ["ultrafeedback.parquet", "trl.jsonl"])
def test_conversational_training_runs(layout, model_dir, tmp_path, capsys):
    dataset, rows = write_layout(layout, tmp_path)
    out = tmp_path / "run"
    code, stdout, err = run(small_args(model_dir, dataset, out, "--max-steps", 2,
                                       "--max-length", 48, "--max-prompt-length", 32), capsys)
    assert code == 0, err
    assert f"{len(rows)} training pairs, 0 held-out, 0 skipped" in stdout
    assert [row["step"] for row in metrics(out)] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in metrics(out))
    assert (out / "adapter_model.safetensors").is_file()


def test_standard_layout_tokenization(tokenizer, model_without_template, tmp_path):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(4))
    rows = standard_rows(4)
    # with a chat template, the standard layout is templated as a one-turn conversation
    examples, _, _ = preferences.load_examples(tokenizer, dataset, "train", max_length=64,
                                               max_prompt_length=48)
    for example, row in zip(examples, rows, strict=True):
        assert (example["prompt"] + example["chosen"]
                == template_ids(tokenizer, [U(row["prompt"]), A(row["chosen"])]))
    # without one, plain text: the tokenizer's BOS, the prompt, then the response and EOS
    plain = modeling.load_tokenizer(model_without_template)
    examples, _, _ = preferences.load_examples(plain, dataset, "train", max_length=64,
                                               max_prompt_length=48)
    for example, row in zip(examples, rows, strict=True):
        assert example["prompt"] == plain(row["prompt"])["input_ids"]
        assert (example["prompt"][0] == plain.bos_token_id
                and example["prompt"].count(plain.bos_token_id) == 1)
        assert (example["chosen"]
                == plain(row["chosen"], add_special_tokens=False)["input_ids"]
                + [plain.eos_token_id])


# ---------------------------------------------------------------- 3. 4-bit QLoRA on CPU

def test_qlora_4bit(model_dir, tmp_path, capsys):
    import bitsandbytes as bnb

    model = modeling.load_model(model_dir, load_in_4bit=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    assert not any(isinstance(m, bnb.nn.Linear4bit)
                   for m in modeling.load_model(model_dir).modules())
    args = train.parse_args([str(a) for a in small_args(model_dir, "unused.jsonl",
                                                        tmp_path / "unused")])
    lora = modeling.add_lora(model, args)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 2, "--load-in-4bit",
                                  "--lr", 1e-3),
                       capsys)
    assert code == 0, err
    assert json.loads((out / "run_config.json").read_text())["load_in_4bit"] is True
    assert (out / "adapter_config.json").is_file()
    saved = adapter(out)
    assert any(saved[n].abs().max() > 0 for n in saved if "lora_B" in n)
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
               for row in metrics(out))


# ---------------------------------------------------------------- 4. gradient accumulation

def test_gradient_accumulation_equivalence(model_dir, tmp_path, capsys):
    """8 pairs as 1×8, 4×2 and 3+3+2 give the same two steps; a different --lr does not (the check
    can fail). Two steps: in the first, lora_B is zero and so is every lora_A gradient; the second
    compares them all."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8, max_words=6))

    def two_steps(name, micro, lr=1e-3):
        out = tmp_path / name
        code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 2, "--batch-size", 8,
                                      "--micro-batch-size", micro, "--lora-dropout", 0, "--lr", lr,
                                      "--seed", 7), capsys)
        assert code == 0, err
        return adapter(out), train_rows(out)

    whole, whole_metrics = two_steps("1x8", 8)
    for name, micro in (("4x2", 2), ("3x3", 3)):
        split, split_metrics = two_steps(name, micro)
        assert_adapters_close(whole, split, atol=1e-6)
        for a, b in zip(whole_metrics, split_metrics, strict=True):
            # Adam hides a uniformly mis-scaled gradient in the adapter; the logged (pre-clip) norm
            # does not
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
            for key in ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)
    other, _ = two_steps("1x8-lr", 8, lr=3e-3)
    lora_a = [name for name in whole if "lora_A" in name]
    assert lora_a
    assert adapters_differ({n: whole[n] for n in lora_a}, {n: other[n] for n in lora_a}, atol=1e-6)


# ---------------------------------------------------------------- 5. truncation and masking

def test_prompt_keeps_its_end_and_response_is_cut(tokenizer):
    words = demo.WORDS[:12]
    prompt = [U("shout: " + " ".join(words))]
    chosen, rejected = A(" ".join(w.upper() for w in words[:6])), A("apple")
    full = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=1000,
                         max_prompt_length=1000)
    assert full["prompt"] == template_ids(tokenizer, prompt, add_generation_prompt=True)
    assert len(full["prompt"]) == 12 + 5  # <bos> <user> shout: 12 words <end> <assistant>
    assert len(full["chosen"]) == 6 + 1 and len(full["rejected"]) == 1 + 1  # + EOS

    # a pair that fits in max_length keeps its whole prompt, whatever max_prompt_length says
    # (as the official repo)
    assert tokenize_pair(tokenizer, prompt, chosen, rejected,
                              max_length=1000, max_prompt_length=5) == full
    cut = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=20, max_prompt_length=5)
    # left truncation: the template's head (<bos> <user>) and the end survive
    assert cut["prompt"] == full["prompt"][:2] + full["prompt"][-3:]
    assert tokenizer.convert_ids_to_tokens(cut["prompt"])[-1] == "<|assistant|>"
    assert cut["chosen"] == full["chosen"] and cut["rejected"] == full["rejected"]

    short = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=10, max_prompt_length=7)
    assert short["prompt"] == full["prompt"][:2] + full["prompt"][-5:]
    assert short["chosen"] == full["chosen"][:3]  # max_length - prompt length
    assert short["rejected"] == full["rejected"]  # already short enough
    assert len(short["prompt"] + short["chosen"]) == 10

    # a short prompt with a long response: the prompt stays whole (one BOS), the responses are cut
    long_chosen = A(" ".join(w.upper() for w in demo.WORDS[:20]))
    short_prompt = tokenize_pair(tokenizer, [U("shout: apple")], long_chosen, rejected,
                                 max_length=12, max_prompt_length=8)
    assert short_prompt["prompt"] == template_ids(tokenizer, [U("shout: apple")],
                                                  add_generation_prompt=True)
    assert (short_prompt["prompt"].count(tokenizer.bos_token_id) == 1
            and len(short_prompt["prompt"]) == 6)
    assert len(short_prompt["prompt"] + short_prompt["chosen"]) == 12
    # nothing left of the responses: skipped
    assert tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=8,
                         max_prompt_length=8) is None
    # a short prompt still fits under the same limits
    assert tokenize_pair(tokenizer, [U("apple")], chosen, rejected,
                              max_length=8, max_prompt_length=8) is not None


def long_and_short_rows():
    """8 pairs; 3 of them with a prompt of 20+ tokens that fills max_prompt_length == max_length =
    12."""
    rows = standard_rows(8, max_words=2)
    for row in rows[:3]:
        row["prompt"] = "shout: " + " ".join(demo.WORDS[:16])
    return rows


def test_skipped_pairs_are_counted(tokenizer, model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", long_and_short_rows())
    examples, _, summary = preferences.load_examples(tokenizer, dataset, "train",
                                              max_length=12, max_prompt_length=12)
    assert (len(examples), summary.counts["train"]["emptied"]) == (5, 3)
    assert all(len(e["prompt"]) + len(e["chosen"]) <= 12 and e["chosen"] and e["rejected"]
               for e in examples)

    out = tmp_path / "run"
    code, stdout, err = run(small_args(model_dir, dataset, out, "--max-steps", 1,
                                       "--max-length", 12, "--max-prompt-length", 12), capsys)
    assert code == 0, err
    assert "5 training pairs, 0 held-out, 3 skipped (response truncated to nothing)" in stdout


def test_every_pair_skipped_is_an_error(model_dir, tmp_path, capsys):
    rows = long_and_short_rows()[:3]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    code, stdout, err = run(small_args(model_dir, dataset, out, "--max-steps", 1,
                                       "--max-length", 12, "--max-prompt-length", 12), capsys)
    assert code == 2
    assert "0 training pairs, 0 held-out, 3 skipped" in stdout
    line = error_line(err)
    assert "pairs.jsonl" in line and "no training pairs left" in line
    assert not out.exists()


# ---------------------------------------------------------------- 6. resume

def test_resume_after_crash_matches_uninterrupted_run(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))

    def full_run(name):
        out = tmp_path / name
        code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 4, "--save-every", 2,
                                      "--lr", 1e-3, "--lora-dropout", 0.1), capsys)
        assert code == 0, err
        return out

    def crash_after_checkpoint_2(out):
        assert (out / "checkpoint-2" / "training_state.pt").is_file()
        assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
        (out / "checkpoint.json").unlink()  # what marks the final save complete
        (out / "training_state.pt").unlink()
        (out / "adapter_model.safetensors").unlink()
        shutil.rmtree(out / "checkpoint-4", ignore_errors=True)

    a = full_run("a")
    assert not (a / "checkpoint-4").exists()  # the final save is not also a checkpoint
    # 4 steps, no warm-up: 1e-3 · (1 + cos(π·s/4)) / 2
    assert ([row["lr"] for row in train_rows(a)]
            == pytest.approx([1e-3, 8.535533905932737e-4, 5e-4, 1.4644660940672628e-4], rel=1e-12))

    b = full_run("b")
    crash_after_checkpoint_2(b)
    code, _, err = run(["--resume", b], capsys)
    assert code == 0, err
    assert_adapters_close(adapter(a), adapter(b), atol=1e-7)
    # what the crash left past step 2 is replaced
    assert [row["step"] for row in metrics(b)] == [1, 2, 3, 4]
    assert ([row["loss"] for row in train_rows(b)]
            == pytest.approx([row["loss"] for row in train_rows(a)], abs=1e-6))
    assert json.loads((b / "run_config.json").read_text())["max_steps"] == 4

    # control: the same resume with another RNG state in the checkpoint (dropout masks differ) ends
    # elsewhere, so the comparison above does depend on the RNG being restored
    c = full_run("c")
    crash_after_checkpoint_2(c)
    state_file = c / "checkpoint-2" / "training_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["rng"][0]["torch"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, state_file)
    code, _, err = run(["--resume", c], capsys)
    assert code == 0, err
    assert adapters_differ(adapter(a), adapter(c), atol=1e-6)


# ---------------------------------------------------------------- 7. bad input

GOOD = {"prompt": "shout: apple river", "chosen": "APPLE RIVER", "rejected": "apple river"}


def _jsonl(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


BAD_DATA = {  # file name -> (content, substrings the error line must contain)
    "layout.jsonl": (_jsonl({"question": "q", "answer": "a"}),
                     ["unknown column layout", "question"]),
    "missing.jsonl": (_jsonl(GOOD, {"prompt": "p", "chosen": "c"}, GOOD),
                      ["row 2", "'rejected'", "missing"]),
    "empty.jsonl": (_jsonl(GOOD, GOOD, {**GOOD, "chosen": ""}), ["row 3", "'chosen'", "empty"]),
    "blank.jsonl": (_jsonl({**GOOD, "prompt": "   "}, GOOD), ["row 1", "'prompt'", "empty"]),
    "number.jsonl": (_jsonl(GOOD, {**GOOD, "chosen": 5}),
                     ["row 2", "'chosen'", "not a string (int)"]),
    "null.jsonl": (_jsonl(GOOD, {**GOOD, "rejected": None}), ["row 2", "'rejected'"]),
    "empty-file.jsonl": ("", ["no rows"]),
    "malformed.jsonl": (_jsonl(GOOD, GOOD) + '{"prompt": "x", "chosen": \n' + _jsonl(GOOD),
                        ["row 3", "malformed JSON"]),
    "list.json": (json.dumps([GOOD, {**GOOD, "rejected": 3}]),
                  ["row 2", "'rejected'", "not a string (int)"]),
    "conversation.jsonl": (_jsonl({"chosen": [U("apple"), A("APPLE")],
                                   "rejected": [U("apple"), A("")]}),
                           ["row 1", "'rejected[1].content'", "empty"]),
    "not-assistant.jsonl": (_jsonl({"chosen": [U("apple"), U("APPLE")],
                                    "rejected": [U("apple"), A("apple")]}),
                            ["row 1", "'chosen'", "assistant"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_dataset_is_a_one_line_error(name, model_dir, tmp_path, capsys):
    content, expected = BAD_DATA[name]
    dataset = tmp_path / name
    dataset.write_text(content)
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1), capsys)
    assert code == 2
    line = error_line(err)
    assert str(dataset) in line
    for part in expected:
        assert part in line, line
    assert not out.exists()  # nothing written for a run that fails on its input


def test_missing_dataset_file(model_dir, tmp_path, capsys):
    dataset = tmp_path / "nowhere.jsonl"
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "run", "--max-steps", 1), capsys)
    assert code == 2
    line = error_line(err)
    assert str(dataset) in line and re.search(r"not found|no such file", line), line


def test_eval_split_of_a_single_file_is_refused(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "run", "--eval-split", "test"),
                       capsys)
    # not the training pairs evaluated as held-out
    assert code == 2 and "--eval-fraction" in error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--model", "some/model"], ["--dataset", "pairs.jsonl"]])
def test_model_and_dataset_go_together(argv, tmp_path, capsys):
    code, _, err = run([*argv, "--output-dir", tmp_path / "run"], capsys)
    assert code == 2
    assert "pass both --model and --dataset" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_gamma_and_gamma_beta_ratio(tmp_path, capsys):
    common = ["--model", "m", "--dataset", "d.jsonl", "--output-dir", tmp_path / "run"]
    code, _, err = run([*common, "--beta", 2, "--gamma", 1.0, "--gamma-beta-ratio", 0.25], capsys)
    assert code == 2
    assert "--gamma and --gamma-beta-ratio" in error_line(err)

    def gamma(*flags):
        return train.parse_args([str(a) for a in [*common, *flags]]).gamma

    # consistent values are accepted; either alone sets γ
    assert gamma("--beta", 2, "--gamma", 1.0, "--gamma-beta-ratio", 0.5) == 1.0
    assert gamma("--beta", 4, "--gamma-beta-ratio", 0.3) == pytest.approx(1.2)
    assert gamma() == 0.5


@pytest.mark.parametrize("flags", [["--micro-batch-size", 0],
                                   ["--micro-batch-size", 0, "--batch-size", 0],
                                   ["--batch-size", 2, "--micro-batch-size", 4],
                                   ["--max-prompt-length", 0], ["--max-steps", 0], ["--beta", 0],
                                   ["--gamma", -1], ["--chat-template", "no-such-template.jinja"],
                                   ["--max-grad-norm", 0], ["--warmup-ratio", 1.5],
                                   ["--lora-dropout", 1.5], ["--max-prompt-length", 64],
                                   ["--lora-alpha", 0], ["--eval-every", -1],
                                   ["--lora-target", "q_proj,lm_head"], ["--lr", -1e-3],
                                   ["--lr", 0], ["--sft-weight", -5], ["--lr", "nan"],
                                   ["--sft-weight", "inf"], ["--beta", "nan"],
                                   ["--gamma-beta-ratio", "nan"], ["--max-grad-norm", "nan"]])
def test_bad_numbers_and_flags_are_usage_errors(flags, model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1, *flags), capsys)
    assert code == 2
    # the message names an offending flag
    assert any(str(flag) in error_line(err) for flag in flags[::2])
    assert not out.exists()


def test_conversational_data_needs_a_chat_template(model_dir, model_without_template, tmp_path,
                                                   capsys):
    dataset, _ = write_layout("trl.jsonl", tmp_path)
    out = tmp_path / "run"
    code, _, err = run(small_args(model_without_template, dataset, out, "--max-steps", 1), capsys)
    assert code == 2
    line = error_line(err)
    assert dataset in line and "chat template" in line and "--chat-template" in line
    assert not out.exists()

    # --chat-template (a file) supplies one; the run's saved tokenizer keeps it
    template = tmp_path / "template.jinja"
    template.write_text(demo.CHAT_TEMPLATE)
    code, _, err = run(small_args(model_without_template, dataset, out, "--max-steps", 1,
                                  "--chat-template", template), capsys)
    assert code == 0, err
    assert modeling.load_tokenizer(str(out)).chat_template == demo.CHAT_TEMPLATE


def test_relative_chat_template_file_survives_resume_from_elsewhere(model_without_template,
                                                                    tmp_path, capsys, monkeypatch):
    """--chat-template template.jinja, relative to where the run started: --resume from another
    folder (the file gone by then) continues with the same template, as the model and dataset paths
    do."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "template.jinja").write_text(demo.CHAT_TEMPLATE)
    monkeypatch.chdir(start)
    code, _, err = run(small_args(model_without_template, dataset, "run", "--max-steps", 1,
                                  "--chat-template", "template.jinja"), capsys)
    assert code == 0, err
    (start / "template.jinja").unlink()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(["--resume", start / "run", "--max-steps", 2], capsys)
    assert code == 0, err
    assert [row["step"] for row in train_rows(start / "run")] == [1, 2]
    assert modeling.load_tokenizer(str(start / "run")).chat_template == demo.CHAT_TEMPLATE


def test_non_empty_output_dir_is_refused_and_untouched(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1), capsys)
    assert code == 2
    line = error_line(err)
    assert str(out) in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"

    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(small_args(model_dir, dataset, empty, "--max-steps", 1), capsys)
    assert code == 0, err


def test_overwrite_with_bad_dataset_deletes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # an earlier run: --overwrite may replace it, but only later
    (out / "run_config.json").write_text("{}")
    (out / "keep.txt").write_text("precious")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_DATA["missing.jsonl"][0])
    code, _, err = run(small_args(model_dir, bad, out, "--max-steps", 1, "--overwrite"), capsys)
    assert code == 2
    assert "row 2" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "run_config.json"]
    assert (out / "keep.txt").read_text() == "precious"

    # nor does a model that cannot be set up (here: LoRA on a module the model does not have)
    good = write_jsonl(tmp_path / "good.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, good, out, "--max-steps", 1, "--overwrite",
                                  "--lora-target", "q_projx"), capsys)
    assert code == 2 and "q_projx" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "run_config.json"]

    # with good data, --overwrite does replace the folder
    code, _, err = run(small_args(model_dir, good, out, "--max-steps", 1, "--overwrite"), capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- 8. objective flags

def test_gamma_beta_ratio_is_stored_and_used(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1,
                                  "--batch-size", 1, "--micro-batch-size", 1,
                                  "--beta", 4, "--gamma-beta-ratio", 0.5), capsys)
    assert code == 0, err
    config = json.loads((out / "run_config.json").read_text())
    assert (config["beta"], config["gamma"], config["gamma_beta_ratio"]) == (4.0, 2.0, 0.5)
    (row,) = metrics(out)  # one pair: loss = -log σ(margin - γ), with γ = 2
    assert row["rewards/chosen"] == pytest.approx(4 * row["logps/chosen"], rel=1e-5)
    loss = -torch.nn.functional.logsigmoid(torch.tensor(row["rewards/margins"] - 2.0)).item()
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_length_normalization_and_sft_weight(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))

    def first_step(name, *extra):
        out = tmp_path / name
        code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1,
                                      "--lora-dropout", 0, *extra),
                           capsys)
        assert code == 0, err
        (row,) = metrics(out)
        assert all(math.isfinite(row[k]) for k in METRIC_KEYS)
        return row, json.loads((out / "run_config.json").read_text())

    plain, _ = first_step("plain")
    summed, config = first_step("summed", "--no-length-normalization")
    assert config["no_length_normalization"] is True
    # summed log-probs over responses of ≥ 2 tokens (word + EOS) are at least 2× the averages, and
    # negative
    assert summed["logps/chosen"] < 2 * plain["logps/chosen"] < 0
    sft, config = first_step("sft", "--sft-weight", 0.5)
    assert config["sft_weight"] == 0.5
    # same model, same batch at step 1: the SimPO loss is unchanged and the SFT term, logged on its
    # own, is the chosen responses' average NLL; the update differs (0.5 × its gradient is added)
    assert sft["logps/chosen"] == pytest.approx(plain["logps/chosen"], rel=1e-6)
    assert sft["loss"] == pytest.approx(plain["loss"], rel=1e-6) and "sft_loss" not in plain
    assert sft["sft_loss"] == pytest.approx(-plain["logps/chosen"], rel=1e-6)
    assert sft["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)
    both, _ = first_step("both", "--no-length-normalization", "--sft-weight", 0.5)
    # per token, whatever the reward's normalisation
    assert both["sft_loss"] == pytest.approx(sft["sft_loss"], rel=1e-5)


# ---------------------------------------------------------------- 9. learning-rate schedule

def test_lr_schedule():
    peak = 2.0
    lrs = [train.lr_at(step, 10, 4, peak) for step in range(10)]
    # linear warm-up, its 4th and last step at the peak
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # cosine from the peak (step 3) over the 7 steps after it
    assert lrs[3:] == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * k / 7))
                                     for k in range(7)])
    assert lrs[3:] == sorted(lrs[3:], reverse=True)
    # ≈ 0.05 peak: near 0, not 0
    assert lrs[-1] == pytest.approx(peak * 0.5 * (1 - math.cos(math.pi / 7)))
    assert lrs[-1] < 0.1 * peak
    # it would reach 0 one step later
    assert train.lr_at(10, 10, 4, peak) == pytest.approx(0.0, abs=1e-12)
    # no warm-up: the first step is at the peak; a single warm-up step is the same thing
    for warmup_steps in (0, 1):
        assert ([train.lr_at(s, 3, warmup_steps, 1.0) for s in range(3)]
                == pytest.approx([1.0, 0.75, 0.25]))
    assert train.lr_at(0, 1, 0, 1.0) == 1.0  # a 1-step run trains at the peak


@pytest.mark.parametrize("steps, warmup_ratio, expected", [
    (1, 0.1, {0: 1e-3}),
    (3, 0.5, {0: 1e-3, 1: 7.5e-4, 2: 2.5e-4}),
    # 29 warm-up steps: step s at (s + 1)/29 of the peak, the peak at step 28, then the cosine
    (50, 0.58, {0: 3.4482758620689657e-05, 27: 9.655172413793104e-04, 28: 1e-3,
                29: 9.949107209404665e-04, 49: 5.089279059533658e-06})])
def test_warmup_steps_are_rounded_down(steps, warmup_ratio, expected, model_dir, tmp_path, capsys):
    """A run warms up for ⌊warmup_ratio × steps⌋ steps: --max-steps 1 trains at the peak, not half
    of it; 0.58 × 50 (28.999… in floats) still gives 29. Expected rates worked out by hand."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "run", "--max-steps", steps,
                                  "--lr", 1e-3, "--warmup-ratio", warmup_ratio, "--batch-size", 1,
                                  "--micro-batch-size", 1),
                       capsys)
    assert code == 0, err
    lrs = [row["lr"] for row in train_rows(tmp_path / "run")]
    assert len(lrs) == steps and max(lrs) == pytest.approx(1e-3, rel=1e-12)
    assert {step: lrs[step] for step in expected} == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- --help

def test_help_lists_the_flag_groups(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--help",
                             "--output-dir", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for group in ("model:", "data:", "SimPO objective:", "optimisation:", "output:"):
        assert group in result.stdout
    for flag in ("--load-in-4bit", "--gamma-beta-ratio", "--micro-batch-size", "--resume",
                 "--overwrite", "--max-prompt-length", "--chat-template", "--sft-weight",
                 "--no-length-normalization"):
        assert flag in result.stdout
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 10. the offline demo

def test_offline_demo(demo_run):
    """`python train.py` (conftest's demo_run, which test_eval evaluates too)."""
    out, stdout = demo_run.run, demo_run.stdout
    assert demo_run.model == out.parent / "demo-model"  # the base model is built next to the run
    assert (demo_run.model / "config.json").is_file()
    assert demo_run.config["model"] == str(demo_run.model)
    rows = metrics(out)
    evals = [row for row in rows if "eval/rewards/accuracies" in row]
    first, last = evals[0], evals[-1]
    # 4 epochs of 32 steps
    assert first["step"] == 0 and last["step"] == max(row["step"] for row in rows) == 128
    assert 0.3 <= first["eval/rewards/accuracies"] <= 0.7
    assert last["eval/rewards/accuracies"] >= 0.9
    assert (f"held-out reward accuracy before training: {first['eval/rewards/accuracies']:.3f}"
            in stdout)
    assert (f"held-out reward accuracy after training: {last['eval/rewards/accuracies']:.3f}"
            in stdout)
    assert (out / "adapter_model.safetensors").is_file() and (out / "curves.png").is_file()


# ---------------------------------------------------------------- edge cases

def test_chat_template_given_as_long_text(model_without_template):
    template = (demo.CHAT_TEMPLATE + "{# " + "a comment that makes this a realistic length " * 8
                + "#}")
    assert modeling.load_tokenizer(model_without_template, template).chat_template == template


def test_consistent_gamma_and_ratio_with_rounding():
    args = train.parse_args(["--model", "m", "--dataset", "d.jsonl", "--beta", "3",
                             "--gamma", "0.3", "--gamma-beta-ratio", "0.1"])
    assert args.gamma == pytest.approx(0.3)


def test_demo_accepts_gamma_beta_ratio(tmp_path):
    args = train.parse_args(["--gamma-beta-ratio", "0.25", "--beta", "4",
                             "--output-dir", str(tmp_path / "demo")])
    assert args.gamma == pytest.approx(1.0)


def test_output_dir_that_is_a_file(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 1), capsys)
    assert code == 2 and str(out) in error_line(err)


@pytest.mark.parametrize("relative", [False, True])
def test_missing_model_folder(relative, tmp_path, capsys, monkeypatch):
    """A mistyped folder is "no such folder", not the hub's "couldn't connect": absolute, or
    relative below a folder that exists (runs/typo, not org/name)."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    model = tmp_path / "no-such-model"
    if relative:
        monkeypatch.chdir(tmp_path.parent)
        model = Path(tmp_path.name) / "no-such-model"
    code, _, err = run(small_args(str(model), dataset, tmp_path / "run", "--max-steps", 1), capsys)
    assert code == 2 and f"--model {model}: no such folder" in error_line(err)


def test_a_missing_chat_template_file_says_so(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "run", "--chat-template",
                                  "no-such.jinja"), capsys)
    assert code == 2
    assert "--chat-template: no-such.jinja: neither a file nor a Jinja template" in error_line(err)


def test_run_folders_hold_no_empty_model_card(demo_run):
    assert not (demo_run.run / "README.md").exists()
    assert not (demo_run.run / "checkpoint-64" / "README.md").exists()


# ------------------------------------------------- gradient checkpointing, periodic eval, report-to

def test_gradient_checkpointing_recomputes_and_changes_nothing(model_dir, tmp_path):
    """With checkpointing each decoder layer runs forward twice per step (again in backward), and
    the update is the same as without it. The model must be in train mode for that: transformers
    skips it in eval mode."""
    torch.manual_seed(0)
    pairs = packing.padded_rows([{"prompt": [2, 5, 7], "chosen": [40, 41, 3],
                                  "rejected": [9, 10, 3]}], pad_id=0)
    grads = {}
    for checkpointing in (False, True):
        flag = "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"
        args = train.parse_args([str(a) for a in small_args(model_dir, "d.jsonl", tmp_path,
                                                            "--lora-dropout", 0, flag)])
        args.load_in_4bit = False
        torch.manual_seed(0)
        model = randomise_lora_b(modeling.prepare_model(args, "cpu", torch.float32))
        calls = []
        # q_proj: the first op inside the checkpointed layer,
        # so recomputed even when torch stops the replay early
        q_proj = model.get_decoder().layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        chosen, rejected = modeling.policy_logps(model, pairs).chunk(2)
        (rejected - chosen).sum().backward()
        assert model.training and len(calls) == (2 if checkpointing else 1)
        grads[checkpointing] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert all(g.abs().max() > 0 for g in grads[False])  # lora_A's too: lora_B is not zero
    for without, with_checkpointing in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(with_checkpointing, without)


def test_eval_every_logs_held_out_metrics(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(12))
    code, out, err = run(small_args(model_dir, dataset, tmp_path / "run", "--eval-fraction", 0.25,
                                    "--max-steps", 3, "--eval-every", 1), capsys)
    assert code == 0, err
    eval_steps = [row["step"] for row in metrics(tmp_path / "run")
                  if "eval/rewards/accuracies" in row]
    assert eval_steps == [0, 1, 2, 3]  # before training, every step, and at the end
    assert "held-out reward accuracy before training" in out and "after training" in out


def test_report_to_tensorboard_writes_every_metric(model_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 2,
                                  "--report-to", "tensorboard"), capsys)
    assert code == 0, err
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # read as soon as the run returns: nothing may be left pending
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert METRIC_KEYS <= set(events.Tags()["scalars"])
    rows = train_rows(out)
    for key in METRIC_KEYS:
        written = events.Scalars(key)
        assert [event.step for event in written] == [row["step"] for row in rows], key
        values = [row[key] for row in rows]
        assert [event.value for event in written] == pytest.approx(values, rel=1e-6), key


@pytest.mark.skipif(bool(importlib.util.find_spec("tensorboard")),
                    reason="tensorboard is installed here")
def test_report_to_a_missing_package_is_refused_before_any_work(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "run",
                                  "--report-to", "tensorboard"), capsys)
    assert code == 2 and "pip install tensorboard" in error_line(err)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------- tokenization at the prompt/response boundary

def test_a_token_across_the_prompt_response_boundary_goes_to_the_response():
    """BPE/SentencePiece tokenizers can merge the end of the templated prompt with the start of the
    response: the pair is tokenized as the model reads it, and the merged token is scored as
    response."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2, "b": 3, "x": 4, "ab": 5},
                               merges=[("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                         "{% if m['role'] == 'user' %}a{% else %}</s>{% endif %}{% endfor %}")
    example = tokenize_pair(tok, [U("x")], A("bx"), A("x"), max_length=64, max_prompt_length=32)
    # "ab" merged into chosen's response; prompt shared; rejected's bare "a" is prompt text, read
    # not scored
    assert example == {"prompt": [0, 4], "chosen": [5, 4, 1], "rejected": [2, 4, 1],
                       "unscored": [0, 1], "prompt_end": [0, 2]}
    for side, text in (("chosen", "<s>xabx</s>"), ("rejected", "<s>xax</s>")):
        assert example["prompt"] + example[side] == tok(text, add_special_tokens=False)["input_ids"]


def test_a_chat_template_error_names_the_row(model_dir, tmp_path, capsys):
    """Gemma-2's template, for one, refuses system turns: one line naming the row, not a Jinja
    traceback."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}"
                + demo.CHAT_TEMPLATE)
    (model / "chat_template.jinja").write_text(template)
    rows = [{"chosen": [U("shout: apple"), A("APPLE")],
             "rejected": [U("shout: apple"), A("apple")]},
            {"chosen": [S("be loud"), U("shout: river"), A("RIVER")],
             "rejected": [S("be loud"), U("shout: river"), A("river")]}]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, _, err = run(small_args(model, dataset, tmp_path / "run"), capsys)
    assert (code == 2 and "row 2" in error_line(err)
            and "System role not supported" in error_line(err))


def test_resuming_a_finished_run_changes_nothing(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(12))
    out = tmp_path / "run"
    code, _, err = run(small_args(model_dir, dataset, out, "--max-steps", 2,
                                  "--eval-fraction", 0.25), capsys)
    assert code == 0, err
    before = {name: (out / name).read_bytes()
              for name in ("metrics.jsonl", "adapter_model.safetensors")}
    code, stdout, err = run(["--resume", out], capsys)
    assert code == 0, err
    assert "finished all 2 steps already" in stdout
    assert before == {name: (out / name).read_bytes() for name in before}


def test_data_that_fits_the_run_badly_gets_a_note(model_dir, model_without_template, tmp_path,
                                                 capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(4))
    code, out, err = run(small_args(model_without_template, dataset, tmp_path / "plain",
                                    "--max-steps", 1, "--batch-size", 32), capsys)
    assert code == 0, err
    assert "note: 4 training pairs, fewer than --batch-size 32" in out
    assert f"note: {model_without_template} has no chat template: each pair is plain text" in out
    code, out, err = run(small_args(model_dir, dataset, tmp_path / "chat", "--max-steps", 1),
                         capsys)
    assert code == 0, err
    assert "note:" not in out


def test_curves_are_drawn_again_from_the_metrics(demo_run, tmp_path, capsys):
    import checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run.run, run_dir)
    (run_dir / "curves.png").unlink()
    assert checkpoints.main([str(run_dir)]) == 0
    assert (run_dir / "curves.png").stat().st_size > 0
    assert checkpoints.main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_gradient_checkpointing_is_on_by_default_also_on_a_cpu():
    """Measured on SmolLM2-135M at --max-length 256 on a CPU: 5.2 GB peak with it, 8.7 without, at
    the same speed; the demo turns it off (a tiny model has no memory to save)."""
    assert train.parse_args(["--model", "m", "--dataset", "d.jsonl"]).gradient_checkpointing
    assert not train.parse_args(["--model", "m", "--dataset", "d.jsonl",
                                 "--no-gradient-checkpointing"]).gradient_checkpointing
    assert train.parse_args([]).gradient_checkpointing is False
