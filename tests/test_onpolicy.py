"""onpolicy.py end to end on tiny models: prompts in order and once, pairs chosen as the reward
model says, every left-out answer and prompt counted, a stopped or crashed run resumed into the very
file an uninterrupted run writes, and its output trained with train.py and judged with
eval.py --judge."""
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_judge import build_reward_model

import demo
import eval
import generation
import judge
import modeling
import onpolicy
import preferences
import train
from cli import UsageError

N_PROMPTS = 10  # distinct ones: batches of 3, 3, 3, 1


def likely_to_stop(folder, logit=0.6):
    """Make a tiny random model end its answer with EOS at about one token in five: embedding
    dimension 0 is a large constant, and only the EOS row of lm_head reads it."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[model.config.eos_token_id, 0] = logit
    model.save_pretrained(folder)


def run(capsys, *argv):
    rc = onpolicy.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(rc, err):
    """Exit code 2 and exactly one `error: ...` line, no traceback: that line."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def records(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("onpolicy")
    sft = demo.build_tiny_model(d / "sft", hidden_size=16)
    likely_to_stop(sft)
    rows = [json.loads(line) for line in (demo.DATA_DIR / "train.jsonl").read_text().splitlines()]
    prompts = [row["prompt"] for row in rows[:N_PROMPTS]]
    listed = prompts[:4] + [prompts[1]] + prompts[4:] + [prompts[0]]  # two repeats, left out
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in listed))
    common = ["--model", sft, "--prompts", d / "prompts.jsonl", "--reward-model",
              build_reward_model(d / "rm"), "--samples", 4, "--max-new-tokens", 6,
              "--batch-size", 3, "--test-fraction", 0.4, "--seed", 1]
    return SimpleNamespace(dir=d, sft=sft, rm=d / "rm", prompts=prompts, common=common)


@pytest.fixture(scope="module")
def built(setup):
    """One uninterrupted run."""
    out = setup.dir / "full"
    rc = onpolicy.main([str(arg) for arg in setup.common + ["--out", out]])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stopped(setup, built):
    """The same run, SIGTERM during its first batch, then the same command again. The prompt ids
    that were sampled from are kept."""
    out, sampled_ids, calls = setup.dir / "stopped", [], []
    original = onpolicy.sample

    def sample_then_signal(model, config, stop, prompts, samples, seed, bar=None):
        sampled_ids.extend(prompts)
        calls.append(len(prompts))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(model, config, stop, prompts, samples, seed, bar)

    argv = [str(arg) for arg in setup.common + ["--out", out]]
    onpolicy.sample = sample_then_signal
    try:
        first = onpolicy.main(argv)
        lines_after_stop = len(records(out))
        second = onpolicy.main(argv)
    finally:
        onpolicy.sample = original
    return SimpleNamespace(out=out, codes=(first, second), lines_after_stop=lines_after_stop,
                           sampled_ids=sampled_ids, calls=calls)


# ---------------------------------------------------------------- choosing pairs

def answers(*scored):
    return [{"text": text, "score": score} for text, score in scored]


def test_pick_takes_the_best_and_the_worst_and_leaves_out_what_teaches_nothing():
    assert (onpolicy.pick(answers(("a", 0.1), ("b", 0.9), ("c", -2.0), ("d", None)), 0.0)
            == (1, 2, None))
    assert onpolicy.pick(answers(("a", None), ("b", 0.9), ("c", None)), 0.0) == \
        (None, None, "fewer than two answers")
    assert onpolicy.pick(answers(("same", 0.5), ("same", 0.5)), 0.0) == (None, None, "identical")
    # argmax and argmin of equal scores are both the first answer: a tie, not a pair of "a" and "a"
    assert onpolicy.pick(answers(("a", 0.5), ("b", 0.5), ("c", 0.5)), 0.0) == (None, None, "tie")
    assert onpolicy.pick(answers(("a", 0.5), ("b", 0.52)), 0.05) == (None, None, "tie")
    assert onpolicy.pick(answers(("a", 0.5), ("b", 0.52)), 0.01) == (1, 0, None)
    # "by --tie-tolerance or less": exactly the tolerance apart (both exact in binary) is a tie
    assert onpolicy.pick(answers(("a", 0.5), ("b", 0.75)), 0.25) == (None, None, "tie")


def test_pick_never_takes_a_non_finite_score():
    nan, inf = float("nan"), float("inf")
    assert onpolicy.pick(answers(("a", nan), ("b", 0.9), ("c", 0.1)), 0.0) == (1, 2, None)
    assert onpolicy.pick(answers(("a", 0.1), ("b", inf), ("c", -inf), ("d", 0.3)), 0.0) == (
        3, 0, None)
    assert onpolicy.pick(answers(("a", nan), ("b", 0.9), ("c", nan)), 0.0) == (
        None, None, "fewer than two answers")


def test_cut_and_empty_answers_are_left_out_and_never_scored(setup, monkeypatch):
    tokenizer = modeling.load_tokenizer(setup.sft)
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ("apple", "TIGER", "<|user|>")}
    row = [([ids["apple"]] * 6, True), ([], False), ([ids["<|user|>"]], False),
           ([ids["apple"]], False), ([ids["TIGER"]], False)]
    seen = []

    def length_judge(model, tokenizer, conversations, batch_size):  # a hand-written reward model
        seen.extend(c[-1]["content"] for c in conversations)
        return [float(len(c[-1]["content"])) for c in conversations]

    monkeypatch.setattr(judge, "score", length_judge)
    args = SimpleNamespace(batch_size=2, tie_tolerance=0.0)
    prompt = [{"role": "user", "content": "shout: apple"}]
    [record] = onpolicy.judge_batch((None, None), [prompt], [row], tokenizer, args)
    assert [a["left_out"] for a in record["answers"]] == ["truncated", "empty", "empty", None, None]
    assert [a["score"] for a in record["answers"]] == [None, None, None, 5.0, 5.0]
    assert [a["tokens"] for a in record["answers"]] == [6, 1, 2, 2, 2]
    assert record["answers"][0]["text"] == "apple apple apple apple apple apple"
    assert seen == ["apple", "TIGER"]
    assert record["left_out"] == "tie" and record["chosen"] is None


def test_a_run_with_few_usable_pairs_says_so():
    """Exit 0 and a summary line are not enough when most answers were cut or no test pair is
    left: each gets a warning line."""
    args = SimpleNamespace(max_new_tokens=16, test_fraction=0.1)
    counts = {"truncated": 6, "train": 3, "test": 0}
    assert list(onpolicy.warnings(counts, 10, args)) == [
        "6 of 10 answers hit --max-new-tokens 16 and were left out: raise it",
        "no test pairs: every held-out prompt was left out (train.py --eval-split test would have "
        "nothing to score)"]
    counts = {"truncated": 5, "train": 0, "test": 1}
    assert list(onpolicy.warnings(counts, 10, args)) == [
        "no training pairs: train.py has nothing to train on"]
    assert list(onpolicy.warnings({"truncated": 0, "train": 3, "test": 0}, 10,
                                  SimpleNamespace(max_new_tokens=16, test_fraction=0.0))) == []


def test_the_test_prompts_are_a_seeded_fraction_and_never_none_by_rounding():
    assert len(onpolicy.held_out(10, 0.4, 1)) == 4 and onpolicy.held_out(10, 0.0, 1) == set()
    # 10 × 0.01 rounds to 0: still one
    assert len(onpolicy.held_out(10, 0.01, 1)) == 1
    assert onpolicy.held_out(10, 0.4, 1) == onpolicy.held_out(10, 0.4, 1) <= set(range(10))
    # any prompt, as the seed draws
    assert set().union(*(onpolicy.held_out(10, 0.4, seed) for seed in range(20))) == set(range(10))


def test_whitespace_only_and_non_finite_answers_are_left_out(monkeypatch):
    """A text of spaces and newlines is empty, never scored; a NaN or ±inf reward leaves the answer
    out with no score."""
    seen = []

    def text_judge(model, tokenizer, conversations, batch_size):
        seen.extend(c[-1]["content"] for c in conversations)
        return [float(c[-1]["content"]) if c[-1]["content"] in ("nan", "inf", "-inf")
                else float(len(c[-1]["content"])) for c in conversations]

    monkeypatch.setattr(judge, "score", text_judge)
    # token "ids" are the texts themselves here
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(ids))
    row = [([" ", "\n", "\t"], False), (["a", "b"], False), (["nan"], False), (["-inf"], False),
           (["inf"], False), (["c"], False)]
    args = SimpleNamespace(batch_size=2, tie_tolerance=0.0)
    [record] = onpolicy.judge_batch((None, None), [[{"role": "user", "content": "hi"}]], [row],
                                    tokenizer, args)
    assert seen == ["ab", "nan", "-inf", "inf", "c"]
    assert [a["left_out"] for a in record["answers"]] == [
        "empty", None, "non-finite score", "non-finite score", "non-finite score", None]
    assert [a["score"] for a in record["answers"]] == [None, 2.0, None, None, None, 1.0]
    assert (record["chosen"], record["rejected"], record["left_out"]) == (1, 5, None)
    assert json.dumps(record, allow_nan=False)


# ---------------------------------------------------------------- a whole run

# A scripted run: these answers in place of sampled ones (an answer of --max-new-tokens 6 words had
# no room for an end of turn: cut), and a reward that is a function of the text
SCRIPT = [
    # 0: a pair, an answer cut
    ["apple river stone", "apple", "maple river", "apple apple apple apple apple apple"],
    # 1: a tie
    ["apple", "river", "stone", "maple"],
    # 2: identical texts, an empty answer
    ["apple river", "apple river", "apple river", ""],
    # 3: fewer than two answers: two empty, one cut
    ["", "", "apple", "river river river river river river"],
    # 4: a pair, two non-finite scores
    ["tiger", "apple", "apple river", "cloud"],
    # 5: fewer than two answers: a non-finite score, an empty answer, a cut one
    ["tiger river", "apple", "", "stone stone stone stone stone stone"],
    # 6-9: pairs; a text given twice is its first answer
    ["apple", "river stone", "candle orbit pepper", "apple"],
    ["harbor violet", "lantern", "meadow falcon copper ember", "glacier willow"],
    ["willow thunder", "velvet", "canyon puzzle rocket", "apple river"],
    ["APPLE RIVER", "apple", "APPLE RIVER STONE", "apple river stone cloud"],
]
PAIRED = {0: (0, 1), 4: (2, 1), 6: (2, 0), 7: (2, 1), 8: (2, 1), 9: (2, 1)}
LEFT_OUT = {1: "tie", 2: "identical", 3: "fewer than two answers", 5: "fewer than two answers"}


def reward(text):
    """The number of words; NaN with "tiger", +inf with "cloud"."""
    if "tiger" in text:
        return float("nan")
    return float("inf") if "cloud" in text else float(len(text.split()))


def answer_left_out(text):
    if len(text.split()) == 6:
        return "truncated"
    if not text:
        return "empty"
    return None if math.isfinite(reward(text)) else "non-finite score"


@pytest.fixture(scope="module")
def scripted(setup):
    """A run of SCRIPT: the seed of each batch, and the lines of samples.jsonl on disk at each
    fsync, are kept."""
    out, seeds, lines_at_fsync, done = setup.dir / "scripted", [], [], []
    tokenizer = modeling.load_tokenizer(setup.sft)

    def scripted_sample(model, config, stop, prompts, samples, seed, bar=None):
        seeds.append(seed)
        texts = SCRIPT[len(done):len(done) + len(prompts)]
        done.extend(prompts)
        return [[(tokenizer.convert_tokens_to_ids(text.split()), len(text.split()) == 6)
                 for text in row] for row in texts]

    def text_judge(model, tokenizer, conversations, batch_size):
        return [reward(c[-1]["content"]) for c in conversations]

    def recording_fsync(fd):
        lines_at_fsync.append(len((out / "samples.jsonl").read_text().splitlines()))
        fsync(fd)

    fsync = os.fsync
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onpolicy, "sample", scripted_sample)
        patch.setattr(judge, "score", text_judge)
        patch.setattr(os, "fsync", recording_fsync)
        assert onpolicy.main([str(arg) for arg in setup.common + ["--out", out]]) == 0
    return SimpleNamespace(out=out, seeds=seeds, lines_at_fsync=lines_at_fsync)


def test_a_run_pairs_every_prompt_once_in_order_and_counts_what_it_leaves_out(setup, scripted,
                                                                              capsys):
    lines = records(scripted.out)
    assert [r["index"] for r in lines] == list(range(N_PROMPTS))
    assert [r["prompt"] for r in lines] == [[{"role": "user", "content": p}] for p in setup.prompts]
    for r, texts in zip(lines, SCRIPT, strict=True):
        assert [a["text"] for a in r["answers"]] == texts
        assert [a["left_out"] for a in r["answers"]] == [answer_left_out(t) for t in texts]
        assert [a["score"] for a in r["answers"]] == [None if answer_left_out(t) else reward(t)
                                                      for t in texts]
        # (+ the stop token)
        assert [a["tokens"] for a in r["answers"]] == [len(t.split()) + (len(t.split()) < 6)
                                                       for t in texts]
    assert {i: (r["chosen"], r["rejected"]) for i, r in enumerate(lines) if not r["left_out"]} == (
        PAIRED)
    assert {i: r["left_out"] for i, r in enumerate(lines) if r["left_out"]} == LEFT_OUT
    # batches of 3 prompts × 4 answers: seed + 12 per batch, and each batch on disk before the next
    assert scripted.seeds == [1, 13, 25, 37]
    assert scripted.lines_at_fsync == [3, 6, 9, 10]
    assert {i for i, r in enumerate(lines) if r["split"] == "test"} == onpolicy.held_out(10, 0.4, 1)
    pairs = {split: [json.loads(line)
                     for line in (scripted.out / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "test")}
    for split in ("train", "test"):
        kept = [r for r in lines if r["left_out"] is None and r["split"] == split]
        assert len(pairs[split]) == len(kept)
        for pair, r in zip(pairs[split], kept, strict=True):
            chosen, rejected = (r["answers"][r[side]] for side in ("chosen", "rejected"))
            assert pair == {"prompt": r["prompt"],
                            "chosen": r["prompt"] + [{"role": "assistant",
                                                      "content": chosen["text"]}],
                            "rejected": r["prompt"] + [{"role": "assistant",
                                                        "content": rejected["text"]}],
                            "score_chosen": chosen["score"], "score_rejected": rejected["score"]}
    # a finished run, run again, rewrites the same files and samples nothing
    before = {name: (scripted.out / name).read_bytes()
              for name in ("samples.jsonl", "train.jsonl", "test.jsonl")}
    rc, out, err = run(capsys, *setup.common, "--out", scripted.out)
    assert rc == 0, err
    assert before == {name: (scripted.out / name).read_bytes() for name in before}
    assert f"holds {N_PROMPTS} of {N_PROMPTS} prompts" in out
    assert (f"{N_PROMPTS} prompts: {len(pairs['train'])} training pairs and {len(pairs['test'])} "
            f"test pairs in {scripted.out}; left out: 1 ties, 1 identical, 2 with fewer than two "
            f"answers (answers left out: 3 cut at --max-new-tokens, 4 empty, 4 with a non-finite "
            f"score)") in out


def test_sigterm_finishes_the_batch_and_the_resumed_run_writes_the_same_files(built, stopped):
    assert stopped.codes == (128 + signal.SIGTERM, 0)
    assert stopped.lines_after_stop == 3  # the first batch, whole
    assert stopped.calls == [3, 3, 3, 1]  # nothing sampled twice
    for name in ("samples.jsonl", "train.jsonl", "test.jsonl"):
        assert (stopped.out / name).read_bytes() == (built / name).read_bytes()


def test_sigterm_during_the_last_batch_ends_the_run_as_usual(setup, built, tmp_path, monkeypatch,
                                                             capsys):
    """Nothing is left to resume: the pairs are written and the exit code is 0."""
    original, calls = onpolicy.sample, []

    def sample_then_signal(*args):
        calls.append(len(args[3]))
        # batches of 3, 3, 3, 1: prompt 10 is the last
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(onpolicy, "sample", sample_then_signal)
    rc, out, err = run(capsys, *setup.common, "--out", tmp_path / "out")
    assert rc == 0 and "SIGTERM: finishing this batch" in err and "stopped" not in err
    assert calls == [3, 3, 3, 1] and f"{N_PROMPTS} prompts: " in out
    for name in ("samples.jsonl", "train.jsonl", "test.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (built / name).read_bytes()


def test_the_stop_message_is_one_line_with_the_command_that_resumes(setup, tmp_path, monkeypatch,
                                                                    capsys):
    original = onpolicy.sample

    def sample_then_ctrl_c(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(onpolicy, "sample", sample_then_ctrl_c)
    rc, _, err = run(capsys, *setup.common, "--out", tmp_path / "out dir")
    assert rc == 130 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert line.startswith("stopped: SIGINT after prompt 3 of 10; resume with: python onpolicy.py ")
    assert f"--out '{tmp_path / 'out dir'}'" in line
    assert len(records(tmp_path / "out dir")) == 3


def test_prompts_are_sampled_from_the_ids_train_py_scores(setup, built, stopped):
    """The prompt of every pair, as train.py tokenizes it, is the very ids the builder sampled from:
    the template applied once, one BOS."""
    tokenizer = modeling.load_tokenizer(setup.sft)
    train_part, test_part, _ = preferences.load_examples(tokenizer, str(built), "train", "test")
    lines = records(built)
    for split, examples in (("train", train_part), ("test", test_part)):
        indices = [r["index"] for r in lines if r["left_out"] is None and r["split"] == split]
        assert len(examples) == len(indices)
        for example, i in zip(examples, indices, strict=True):
            assert preferences.generation_prompt(example) == stopped.sampled_ids[i]
            assert stopped.sampled_ids[i].count(tokenizer.bos_token_id) == 1
            expected = tokenizer.apply_chat_template(lines[i]["prompt"], add_generation_prompt=True)
            assert stopped.sampled_ids[i] == expected["input_ids"]


@pytest.mark.parametrize("complete_lines", [3, 4])  # at a batch boundary, and inside a batch
def test_a_torn_last_line_is_dropped_and_no_prompt_is_lost_or_repeated(setup, built, complete_lines,
                                                                       tmp_path, capsys):
    out = tmp_path / "crashed"
    out.mkdir()
    shutil.copy(built / "onpolicy.json", out)
    full = (built / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(full[:complete_lines]) + full[complete_lines][:40])
    rc, stdout, err = run(capsys, *setup.common, "--out", out)
    assert rc == 0, err
    assert f"holds {complete_lines} of {N_PROMPTS} prompts" in stdout
    resumed = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    assert resumed[:complete_lines] == full[:complete_lines]
    assert [json.loads(line)["index"] for line in resumed] == list(range(N_PROMPTS))
    # the batches line up with the uninterrupted run's: the same answers
    if complete_lines % 3 == 0:
        assert resumed == full


def test_a_rerun_refuses_other_settings_or_other_prompts(setup, built, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    rc, _, err = run(capsys, *setup.common, "--out", out, "--samples", 3)
    assert error_line(rc, err) == f"error: {out} holds answers drawn with --samples 4: pass the " \
                                  f"same, or another --out"
    listed = (setup.dir / "prompts.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "reordered.jsonl").write_text("".join([listed[1], listed[0]] + listed[2:]))
    json_settings = json.loads((out / "onpolicy.json").read_text())
    reordered = {"prompts": str(tmp_path / "reordered.jsonl")}
    (out / "onpolicy.json").write_text(json.dumps(json_settings | reordered))
    argv = [str(tmp_path / "reordered.jsonl") if str(arg) == str(setup.dir / "prompts.jsonl")
            else arg for arg in setup.common]
    rc, _, err = run(capsys, *argv, "--out", out)
    line = error_line(rc, err)
    assert "samples.jsonl: line 1 is not prompt 1 of" in line and "prompts changed" in line


# A value other than the test run's for each setting a re-run must keep
CHANGED = {"model": "other-model", "prompts": "other.jsonl", "split": "test",
           "reward_model": "other-rm", "samples": 5, "temperature": 1.0, "top_p": 0.9,
           "max_new_tokens": 7, "seed": 2, "test_fraction": 0.5, "tie_tolerance": 0.1,
           "chat_template": "{{ messages }}", "load_in_4bit": True}


@pytest.mark.parametrize("key", onpolicy.FIXED)
def test_a_rerun_refuses_each_fixed_setting_changed(built, tmp_path, key):
    settings = json.loads((built / "onpolicy.json").read_text())
    # every setting recorded, and this test changes each
    assert list(settings) == list(CHANGED) and settings[key] != CHANGED[key]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(built / "onpolicy.json", out)
    with pytest.raises(UsageError) as refusal:
        onpolicy.resume(out, SimpleNamespace(**settings | {key: CHANGED[key]}), [])
    assert str(refusal.value) == (f"{out} holds answers drawn with --{key.replace('_', '-')} "
                                  f"{settings[key]}: pass the same, or another --out")
    assert json.loads((out / "onpolicy.json").read_text()) == settings


@pytest.mark.parametrize("flags, message", [
    (["--samples", 1], "--samples must be >= 2"),
    (["--top-p", 0], "--top-p in (0, 1]"),
    (["--test-fraction", 1], "--test-fraction in [0, 1)"),
])
def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys, flags, message):
    rc, _, err = run(capsys, *setup.common, "--out", tmp_path / "out", *flags)
    assert message in error_line(rc, err) and not (tmp_path / "out").exists()


def test_bad_prompts_and_reward_models_are_one_line_errors(setup, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "shout: apple"}\n{"prompt": ""}\n')
    argv = [str(tmp_path / "bad.jsonl") if str(arg) == str(setup.dir / "prompts.jsonl") else arg
            for arg in setup.common]
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "out")
    assert error_line(rc, err) == f"error: {tmp_path / 'bad.jsonl'}: row 2: field 'prompt' is empty"
    argv = [setup.sft if str(arg) == str(setup.rm) else arg for arg in setup.common]
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "out2")
    line = error_line(rc, err)
    assert line.startswith(f"error: --reward-model {setup.sft} is not a reward model")


def test_the_conversational_layout_gives_the_same_prompts():
    standard = onpolicy.read_prompts(str(demo.DATA_DIR / "test.jsonl"), "train")
    chat = onpolicy.read_prompts(str(demo.DATA_DIR.with_name("demo-chat") / "test.jsonl"), "train")
    assert [messages for messages, _ in standard] == [messages for messages, _ in chat]


def test_left_padding_does_not_change_an_answer(tmp_path):
    folder = demo.build_tiny_model(tmp_path / "model", hidden_size=16)
    tokenizer, model = modeling.load_tokenizer(folder), modeling.load_model(folder).eval()
    config, stop = generation.sampling_config(model, tokenizer, 1.0, 1.0, 8)
    config.do_sample = False  # greedy: the same answer whatever the random numbers
    model.generation_config = config
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)["input_ids"]
               for text in ("shout: apple", "whisper: apple river stone cloud tiger")]
    alone = [onpolicy.sample(model, config, stop, [ids], 1, 0)[0] for ids in prompts]
    assert onpolicy.sample(model, config, stop, prompts, 1, 0) == alone
    assert all(len(ids) >= 6 for [(ids, _)] in alone)  # (something was compared)


def test_answer_k_is_drawn_after_the_seed_plus_k(tmp_path):
    folder = demo.build_tiny_model(tmp_path / "model", hidden_size=16)
    tokenizer, model = modeling.load_tokenizer(folder), modeling.load_model(folder).eval()
    config, stop = generation.sampling_config(model, tokenizer, 1.0, 1.0, 8)
    model.generation_config = config
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)["input_ids"]
               for text in ("shout: apple", "whisper: apple river stone cloud tiger")]
    moved = []
    together = onpolicy.sample(model, config, stop, prompts, 3, 7,
                               SimpleNamespace(update=moved.append))
    assert moved == [len(prompts)] * 3  # the progress bar moves by answer
    for k in range(3):
        alone = onpolicy.sample(model, config, stop, prompts, 1, 7 + k)
        assert [answers[k] for answers in together] == [answers[0] for answers in alone]
    # (the three seeds draw three answers)
    assert len({tuple(ids) for ids, _ in together[0]}) == 3


# ---------------------------------------------------------------- the loop: pairs -> train -> judge

def test_its_pairs_train_and_the_run_is_judged_by_the_reward_model(setup, built, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["--model", setup.sft, "--dataset", str(built), "--eval-split", "test",
                       "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
                       "--max-length", "64", "--max-prompt-length", "32", "--output-dir",
                       str(run_dir)]) == 0
    capsys.readouterr()
    # as many prompts as --judge needs; the test split has fewer
    assert eval.main(["--adapter", str(run_dir), "--generate", str(judge.MIN_PROMPTS),
                      "--max-new-tokens", "6", "--judge", str(setup.rm)]) == 0
    out, err = capsys.readouterr()
    assert "judging" in err  # progress, batch by batch
    report = json.loads((run_dir / "eval.json").read_text())["judge"]
    test_pairs = preferences.read_pairs(str(built), "test")
    assert report["reward_model"] == str(setup.rm) and report["prompts"] == len(test_pairs) < 8
    assert 0 <= report["win_rate"] <= 1 and report["lc_win_rate"] is None
    assert f"judged by {setup.rm} on {len(test_pairs)} prompts" in out
    assert "length-controlled n/a (not estimated below 8 prompts)" in out
    # each sample's scores: the reward model on the split's prompt as messages and the sampled
    # answer
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    model, tokenizer = judge.load(str(setup.rm))
    for sample in samples:
        prompt = test_pairs[sample["row"]].prompt
        assert sample["prompt"] == tokenizer.decode(
            modeling.load_tokenizer(setup.sft).apply_chat_template(
                prompt, add_generation_prompt=True)["input_ids"])
        for name in ("policy", "base"):
            [expected] = judge.score(model, tokenizer, [prompt + [{"role": "assistant",
                                                                   "content": sample[name]}]])
            assert sample[f"{name}_score"] == pytest.approx(expected, abs=1e-5)
    rc = eval.main(["--adapter", str(run_dir), "--judge", str(setup.rm)])
    assert rc == 2 and "--judge compares sampled answers" in capsys.readouterr().err
    assert Path(run_dir / "eval.json").is_file()


def test_every_flag_says_what_it_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        onpolicy.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--temperature", "0.8"), ("--top-p", "0.95"), ("--seed", "42")):
        assert re.search(rf"{flag} \S+ [a-z].*?\(default: {default}\)", text), flag
