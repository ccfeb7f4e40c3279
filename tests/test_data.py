"""preferences.py on real chat tokenizers and real UltraFeedback rows (../shared/fixtures, skipped
when absent), and on the tiny demo tokenizer: exact token ids, identical pairs, the datasets cache,
CSV text, and which pairs eval.py scores. The real-tokenizer runs use a random Llama model of hidden
size 8 with that vocabulary."""
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import eval
import modeling
import preferences
import train

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
REAL_ROWS = FIXTURES / "real-data" / "ultrafeedback_trl_eval200.jsonl"
REAL_TOKENIZERS = ["llama3-instruct", "gemma2-it", "mistral-instruct"]
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is absent")
# SmolLM2-135M-Instruct, as tests/test_real_model.py finds it (ChatML: its BOS <|im_start|> opens
# every turn)
SMOLLM2 = Path(os.environ.get("SIMPO_REAL_MODEL",
                              "~/.cache/simpo-fixtures/smollm2-135m-instruct")).expanduser()


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """A fresh `datasets` cache per test: hits and misses are this test's own."""
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return demo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=16)


def real_tokenizer(name):
    return modeling.load_tokenizer(str(FIXTURES / "real-tokenizers" / name))


def template_ids(tokenizer, conversation, **options):
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, **options)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def quiet(main, argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- exact ids on real templates

@needs_fixtures
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_ids_equal_the_template_up_to_the_end_of_turn_token(name):
    tokenizer = real_tokenizer(name)
    end = preferences.end_of_turn(tokenizer)
    terminator = tokenizer.convert_tokens_to_ids(end.terminator)
    assert end.terminator == {"llama3-instruct": "<|eot_id|>", "gemma2-it": "<end_of_turn>",
                              "mistral-instruct": "</s>"}[name]
    rows = [json.loads(line) for line in REAL_ROWS.read_text().splitlines()]
    examples, _, summary = preferences.load_examples(tokenizer, str(REAL_ROWS), "train",
                                                     max_length=100_000, max_prompt_length=100_000)
    kept = [row for row in rows if row["chosen"] != row["rejected"]]
    assert len(examples) == len(kept) == 199 and summary.counts["train"]["identical"] == 1
    for example, row in zip(examples, kept, strict=True):
        prompt = [{"role": "user", "content": row["prompt"]}]
        generation_prompt = template_ids(tokenizer, prompt, add_generation_prompt=True)
        # the prompt ends where the generation prompt ends, but for one token that spans the
        # boundary
        assert example["prompt"] == generation_prompt[:len(example["prompt"])]
        assert (len(generation_prompt) - len(example["prompt"])
                <= (1 if name == "mistral-instruct" else 0))
        # ... and the model samples after the prompt rendered alone
        assert preferences.generation_prompt(example) == generation_prompt
        for side in ("chosen", "rejected"):
            whole = template_ids(tokenizer, prompt + [{"role": "assistant", "content": row[side]}])
            ids = example["prompt"] + example[side]
            assert ids == whole[:len(ids)]  # exactly what the model reads ...
            # ... up to end of turn
            assert ids[-1] == terminator and ids.count(tokenizer.bos_token_id) == 1
            # what the template writes after it (Gemma-2's "\n") is never generated: not scored
            assert whole[len(ids):] == tokenizer(end.suffix.removeprefix(end.terminator),
                                                 add_special_tokens=False)["input_ids"]


@needs_fixtures
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_train_and_eval_run_with_each_real_tokenizer(name, tmp_path, capsys):
    """Two steps of train.py and then eval.py on a random hidden-8 Llama of the tokenizer's
    vocabulary size, with the real tokenizer files next to it, on 8 real pairs (one of them with
    chosen == rejected)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = tmp_path / "model"
    tokenizer = real_tokenizer(name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model)
    # the files as published, not re-saved
    for file in (FIXTURES / "real-tokenizers" / name).iterdir():
        shutil.copy(file, model / file.name)
    rows = [json.loads(line) for line in REAL_ROWS.read_text().splitlines()]
    identical = next(row for row in rows if row["chosen"] == row["rejected"])
    dataset = write_jsonl(tmp_path / "pairs.jsonl", [identical] + rows[:7])
    out = tmp_path / "run"
    code, stdout, err = quiet(train.main, ["--model", model, "--dataset", dataset,
                                           "--output-dir", out, "--max-steps", 2, "--batch-size", 2,
                                           "--micro-batch-size", 2, "--eval-fraction", 0.25,
                                           "--max-length", 48, "--max-prompt-length", 32,
                                           "--lora-r", 2, "--lora-alpha", 4],
                              capsys)
    assert code == 0, err
    assert "1 left out (chosen and rejected identical)" in stdout
    code, stdout, err = quiet(eval.main, ["--adapter", out], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] + report["skipped"] == 2 and report["training_pairs"] == 0
    assert all(np.isfinite(report["policy"][key]) for key in ("loss", "rewards/margins"))
    trained = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1]
    # the same pairs
    assert report["policy"]["loss"] == pytest.approx(trained["eval/loss"], abs=1e-5)
    # the tokenizer saved with the run reads the real conversations as the model's own does
    saved = modeling.load_tokenizer(str(out))
    for row in rows[:20]:
        conversation = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["chosen"]}]
        assert template_ids(saved, conversation) == template_ids(tokenizer, conversation)


# the template's head, and the end of a one-question prompt after its text
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA3_FOLDER = FIXTURES / "real-tokenizers" / "llama3-instruct"


@pytest.mark.parametrize("folder, template", [(SMOLLM2, CHATML), (LLAMA3_FOLDER, LLAMA3)],
                         ids=["smollm2-chatml", "llama3-instruct"])
def test_a_truncated_prompt_keeps_the_template_head_and_the_assistant_header(folder, template,
                                                                              tmp_path):
    """A prompt over --max-prompt-length loses the start of its text, not of the conversation: the
    template's head (BOS, SmolLM2's default system turn, the user's role header) and the end (the
    question, the assistant's header) stay."""
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {folder}")
    tokenizer = modeling.load_tokenizer(str(folder))
    head = preferences.prompt_head(tokenizer)
    assert tokenizer.decode(head) == template[0]
    prompt = " ".join(demo.WORDS * 20) + " So which word comes last?"
    dataset = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "Yes, that one.",
                                                      "rejected": "No idea."}])
    examples, _, _ = preferences.load_examples(tokenizer, dataset, "train", max_length=64,
                                               max_prompt_length=48)
    whole = template_ids(tokenizer, [{"role": "user", "content": prompt}],
                         add_generation_prompt=True)
    ids = examples[0]["prompt"]
    assert len(whole) > 100 and len(ids) == 48
    assert ids == whole[:len(head)] + whole[len(head) - 48:]
    text = tokenizer.decode(ids)
    assert text.startswith(template[0])
    assert text.endswith(" So which word comes last?" + template[1])
    # with little room, the head has at most half of it: the end still holds the assistant's header
    short, _ = preferences._truncate(whole, [[7]], head, 20, 16)
    keep = min(len(head), 8)
    assert short == whole[:keep] + whole[keep - 16:]


# ---------------------------------------------------------------- identical pairs, summary, storage

def test_identical_pairs_are_left_out_and_counted(tiny_model, tmp_path):
    tokenizer = modeling.load_tokenizer(tiny_model)
    rows = [{"prompt": "shout: apple", "chosen": "APPLE", "rejected": "apple"},
            {"prompt": "shout: river", "chosen": "RIVER", "rejected": "RIVER"},  # teaches nothing
            {"prompt": "whisper: " + " ".join(demo.WORDS[:12]), "chosen": "stone",
             "rejected": "STONE"},
            {"prompt": "whisper: cloud tiger", "chosen": "cloud tiger", "rejected": "CLOUD TIGER"}]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples, held_out, summary = preferences.load_examples(tokenizer, dataset, "train",
                                                            max_length=8, max_prompt_length=8)
    assert summary.counts["train"] == {"pairs": 2, "identical": 1, "emptied": 1, "truncated": 1}
    assert summary.skipped("train") == 2 and len(held_out) == 0
    assert [tokenizer.decode(examples[i]["chosen"], skip_special_tokens=True)
            for i in range(2)] == ["APPLE", "cloud"]  # the last one cut at its end to fit 8 tokens
    text = str(summary)
    assert ("2 training pairs, 0 held-out, 1 skipped (response truncated to nothing), 1 left out "
            "(chosen and rejected identical), 1 truncated but kept" in text)
    assert "mean" in text and "p95" in text and summary.lengths["chosen"]["max"] == 2


def test_a_pair_whose_prompt_alone_is_cut_counts_as_truncated(tiny_model, tmp_path):
    tokenizer = modeling.load_tokenizer(tiny_model)
    rows = [{"prompt": "whisper: " + " ".join(demo.WORDS), "chosen": "stone", "rejected": "STONE"},
            {"prompt": "shout: apple", "chosen": "APPLE", "rejected": "apple"}]
    examples, _, summary = preferences.load_examples(tokenizer, write_jsonl(
        tmp_path / "pairs.jsonl", rows), "train", max_length=16, max_prompt_length=12)
    assert [len(examples[i]["prompt"]) for i in range(2)] == [12, 6]
    assert [examples[0]["chosen"], examples[0]["rejected"]] == [
        tokenizer.convert_tokens_to_ids(["stone", "<|end|>"]),
        tokenizer.convert_tokens_to_ids(["STONE", "<|end|>"])]
    assert summary.counts["train"]["truncated"] == 1 and "1 truncated but kept" in str(summary)


def test_without_a_template_the_prompt_is_its_text_after_bos(tiny_model, tmp_path):
    tokenizer = modeling.load_tokenizer(tiny_model)
    tokenizer.chat_template = None
    dataset = write_jsonl(tmp_path / "pairs.jsonl",
                          [{"prompt": "shout: apple", "chosen": "APPLE", "rejected": "apple"}])
    [example] = preferences.load_examples(tokenizer, dataset, "train")[0][:]
    prompt = tokenizer.convert_tokens_to_ids(["<|bos|>", "shout:", "apple"])
    assert example["prompt"] == preferences.generation_prompt(example) == prompt
    assert example["chosen"] == tokenizer.convert_tokens_to_ids(["APPLE", "<|end|>"])


def test_a_split_of_identical_pairs_only_loads_as_no_pairs(tiny_model, tmp_path):
    """A batch with no pair to tokenize: a chat template refuses an empty list of conversations."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl",
                          [{"prompt": "shout: river", "chosen": "RIVER", "rejected": "RIVER"}])
    examples, _, summary = preferences.load_examples(modeling.load_tokenizer(tiny_model), dataset,
                                                     "train")
    assert len(examples) == 0 and summary.counts["train"]["identical"] == 1
    assert summary.lengths == {} and "0 training pairs" in str(summary)


def test_pairs_are_held_in_numpy_and_indexed_like_a_list(tiny_model, tmp_path):
    tokenizer = modeling.load_tokenizer(tiny_model)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", demo.make_pairs([["apple", "river"], ["stone"],
                                                                     ["cloud", "tiger", "maple"]],
                                                                    random.Random(0)))
    examples, _, _ = preferences.load_examples(tokenizer, dataset, "train")
    for ids, starts in examples.columns.values():
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and len(starts) == 4
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0))
    # train.py's indexing
    assert [examples[i] for i in order] == [examples[int(i)] for i in order.tolist()]
    assert examples[0:2] == [examples[0], examples[1]] and examples[-1] == examples[2]
    assert isinstance(examples[0]["prompt"], list)  # collate and generate take lists


def test_the_data_fingerprint_leaves_out_what_only_sampling_reads():
    """A resume checks the training pairs: a run started before "prompt_end" existed resumes."""
    def examples(prompt_end):
        rows = {"prompt": [1, 2], "chosen": [3], "rejected": [4], "unscored": [0, 0],
                "prompt_end": prompt_end}
        columns = {name: (np.array(ids, np.int32), np.array([0, len(ids)]))
                   for name, ids in rows.items()}
        return preferences.Examples(columns, np.arange(1))

    assert examples([0]).fingerprint() == examples([1, 5]).fingerprint()
    assert examples([0]).fingerprint() == preferences.Examples(
        {name: examples([0]).columns[name] for name in preferences.COLUMNS[:4]},
        np.arange(1)).fingerprint()


# ---------------------------------------------------------------- the datasets cache

def test_second_load_reads_the_cache_and_any_change_misses_it(tiny_model, tmp_path, monkeypatch):
    calls = []
    tokenize_batch = preferences.tokenize_batch
    # rows tokenized per call
    monkeypatch.setattr(preferences, "tokenize_batch",
                        lambda *a, **k: calls.append(len(a[1])) or tokenize_batch(*a, **k))
    tokenizer = modeling.load_tokenizer(tiny_model)
    words = [demo.WORDS[i:i + 2] for i in range(12)]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", demo.make_pairs(words, random.Random(0)))

    def load(tok=tokenizer, max_length=64):
        calls.clear()
        examples, _, summary = preferences.load_examples(tok, dataset, "train",
                                                         max_length=max_length,
                                                         max_prompt_length=32)
        return [examples[i] for i in range(len(examples))], summary.from_cache, sum(calls)

    first, cached, tokenized = load()
    assert (cached, tokenized) == (False, 12)
    again, cached, tokenized = load()
    # the second time only the 8 rows that check the cached ids against the tokenizer
    assert (again, cached, tokenized) == (first, True, 8)
    # a different template, --max-length, or data: tokenized anew
    other = modeling.load_tokenizer(tiny_model,
                                    demo.CHAT_TEMPLATE.replace("' <|end|> '", "' <|end|>'"))
    assert load(tok=other)[1:] == (False, 12)
    assert load(max_length=63)[1:] == (False, 12)
    other_eos = modeling.load_tokenizer(tiny_model)
    other_eos.eos_token = "<|unk|>"  # what ends a response where no template says so
    assert load(tok=other_eos)[1:] == (False, 12)
    write_jsonl(Path(dataset), demo.make_pairs(words[:11], random.Random(0)))
    assert load()[1:] == (False, 11)


def test_a_changed_max_prompt_length_tokenizes_anew(tiny_model, tmp_path):
    """Only the last row's prompt is long: the 8 rows that check a cached split do not change, so
    only the fingerprint can tell."""
    tokenizer = modeling.load_tokenizer(tiny_model)
    rows = demo.make_pairs([demo.WORDS[i:i + 2] for i in range(12)], random.Random(0))
    rows.append({"prompt": "whisper: " + " ".join(demo.WORDS), "chosen": "a", "rejected": "b"})
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def load(max_prompt_length):
        examples, _, summary = preferences.load_examples(tokenizer, dataset, "train",
                                                         max_length=24,
                                                         max_prompt_length=max_prompt_length)
        return len(examples[-1]["prompt"]), summary.from_cache

    assert load(16) == (16, False)
    assert load(16) == (16, True)
    assert load(12) == (12, False)


# ---------------------------------------------------------------- CSV text (issue 12, item 11)

def test_csv_text_is_read_as_text(tiny_model, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"what is 6 x 7?",42,41\n"bond?",007,7\n'
                    '"nothing?",None,NA\n')
    pairs = preferences.read_pairs(str(path), "train")
    assert [(p.chosen["content"], p.rejected["content"]) for p in pairs] == \
        [("42", "41"), ("007", "7"), ("None", "NA")]
    examples, _, _ = preferences.load_examples(modeling.load_tokenizer(tiny_model), str(path),
                                               "train")
    assert len(examples) == 3


# ---------------------------------------------------------- which pairs eval.py scores (items 1, 9)

def test_eval_split_of_a_single_file_is_refused_and_the_report_names_the_pairs(
        tiny_model, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl",
                          demo.make_pairs([[w] for w in demo.WORDS[:12]], random.Random(0)))
    out = tmp_path / "run"
    code, _, err = quiet(train.main, ["--model", tiny_model, "--dataset", dataset,
                                      "--output-dir", out, "--eval-fraction", 0.25,
                                      "--max-steps", 1, "--batch-size", 4], capsys)
    assert code == 0, err
    # would score all 12
    code, _, err = quiet(eval.main, ["--adapter", out, "--split", "test"], capsys)
    assert code == 2 and "--split test" in err and "single file" in err and "Traceback" not in err
    assert not (out / "eval.json").exists()
    code, stdout, err = quiet(eval.main, ["--adapter", out], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 3 and report["training_pairs"] == 0
    assert "held out" in report["scored"] and "--eval-fraction 0.25" in report["scored"]
    assert f"3 pairs scored: {report['scored']}" in stdout


def test_eval_json_skipped_counts_only_the_pairs_evaluated(tiny_model, tmp_path, capsys):
    rng = random.Random(0)
    rows = demo.make_pairs([[w] for w in demo.WORDS[:12]], rng)
    for row in rows[:6]:  # 6 prompts too long for --max-length 8: emptied wherever they land
        row["prompt"] = "shout: " + " ".join(demo.WORDS[:10])
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    order = list(range(12))
    random.Random(42).shuffle(order)  # train.py's seeded held-out slice (--seed 42)
    held_out_emptied = sum(i < 6 for i in order[:6])
    assert held_out_emptied not in (0, 6)  # some emptied pairs in each part: the check can fail
    out = tmp_path / "run"
    code, _, err = quiet(train.main, ["--model", tiny_model, "--dataset", dataset,
                                      "--output-dir", out, "--eval-fraction", 0.5,
                                      "--max-steps", 1, "--batch-size", 2,
                                      "--max-length", 8, "--max-prompt-length", 8], capsys)
    assert code == 0, err
    code, _, err = quiet(eval.main, ["--adapter", out], capsys)
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["skipped"] == held_out_emptied and report["pairs"] == 6 - held_out_emptied


# ---------------------------------------------------------------- the benchmark script runs

def test_bench_data_writes_json(tiny_model, tmp_path):
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "bench" / "loading.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tokenizer", tiny_model, "--rows", str(demo.DATA_DIR / "train.jsonl"),
                "--pairs", "600", "--repeat", "1", "--out", str(tmp_path / "loading.json")])
    result = json.loads((tmp_path / "loading.json").read_text())
    assert result["pairs"] == result["kept"] == 600 and result["second_load_read_cache"] is True
    assert result["first_load_ratio"] > 0 and result["bytes_per_token_id"] < 8
