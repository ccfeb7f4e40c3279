"""eval.py: held-out reward accuracy, exact KL(policy ‖ base) and sampled lengths, checked against
independent float64 / full-logit computations on the offline demo and on tiny models."""
import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

import demo
import eval
import generation
import modeling
import packing
import preferences
import simpo
import train

# ---------------------------------------------------------------- helpers

def run_eval(capsys, *argv):
    rc = eval.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc, err, *fragments):
    """Exit code 2, exactly one `error: ...` line on stderr, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def quiet(fn, *args):
    """Call fn(*args) with stdout and stderr captured (module-scoped fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn(*args)
    return result, out.getvalue(), err.getvalue()


def full_logits(model, ids):
    """Float64 log-softmax of one unpadded sequence's full logits: (T, V)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def ref_kl(log_p, log_q):
    """Σ_v p(v) (log p(v) − log q(v)) per row, float64."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------- fixtures
# demo_run, the offline demo trained once (with a checkpoint at step 64), is conftest.py's:
# test_train checks the same run.

@pytest.fixture(scope="module")
def demo_eval(demo_run):
    """`eval.py --adapter <run>` with nothing else: the run's own held-out split and settings."""
    rc, out, err = quiet(eval.main, ["--adapter", str(demo_run.run)])
    assert rc == 0, err
    return SimpleNamespace(stdout=out, report=json.loads((demo_run.run / "eval.json").read_text()))


@pytest.fixture(scope="module")
def reference(demo_run):
    """Independent numbers for the demo's held-out pairs: one unpadded sequence at a time, full
    logits, float64 softmax over the whole vocabulary; the base is the same model with the adapter
    disabled."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_run.run)
    cfg = demo_run.config
    _, examples, _ = preferences.load_examples(tokenizer, cfg["dataset"], cfg["split"],
                                               cfg["eval_split"], 0.0, cfg["seed"],
                                               cfg["max_length"], cfg["max_prompt_length"])
    base = AutoModelForCausalLM.from_pretrained(demo_run.model, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, str(demo_run.run)).eval()
    logps = {(m, s): [] for m in ("policy", "base") for s in ("chosen", "rejected")}
    kl = {s: 0.0 for s in ("chosen", "rejected")}
    tokens = {s: 0 for s in ("chosen", "rejected")}
    for e in examples:
        for side in ("chosen", "rejected"):
            ids = e["prompt"] + e[side]
            labels = torch.tensor([[packing.IGNORE_INDEX] * len(e["prompt"]) + e[side]])
            with torch.no_grad():
                p_logits = policy(input_ids=torch.tensor([ids])).logits
                with policy.disable_adapter():
                    b_logits = policy(input_ids=torch.tensor([ids])).logits
            logps["policy", side].append(simpo.sequence_logps(p_logits, labels).item())
            logps["base", side].append(simpo.sequence_logps(b_logits, labels).item())
            # positions len(prompt)-1 .. len(ids)-2 predict the response tokens
            response = slice(len(e["prompt"]) - 1, len(ids) - 1)
            log_p = p_logits[0].double().log_softmax(-1)[response]
            log_q = b_logits[0].double().log_softmax(-1)[response]
            kl[side] += ref_kl(log_p, log_q).sum().item()
            tokens[side] += len(e[side])
    return SimpleNamespace(tokenizer=tokenizer, examples=examples, policy=policy, logps=logps,
                           kl=kl, tokens=tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A hidden-32 model, a 24-pair jsonl, an empty jsonl; a LoRA run holding out 25 % of the pairs
    and a full fine-tuning run with no held-out pairs, one or two optimizer steps each."""
    d = tmp_path_factory.mktemp("eval_tiny")
    model = demo.build_tiny_model(d / "tiny-model", hidden_size=32)
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(
        (demo.DATA_DIR / "train.jsonl").read_text().splitlines(keepends=True)[:24]))
    (d / "empty.jsonl").write_text("")
    common = ["--model", model, "--dataset", str(pairs), "--lr", "1e-2",
              "--batch-size", "4", "--micro-batch-size", "2"]
    lora, full = d / "tiny-lora", d / "tiny-full"
    rc, _, err = quiet(train.main, common + ["--eval-fraction", "0.25", "--max-steps", "2",
                                             "--output-dir", str(lora)])
    assert rc == 0, err
    rc, _, err = quiet(train.main, common + ["--full", "--max-steps", "1",
                                             "--output-dir", str(full)])
    assert rc == 0, err
    return SimpleNamespace(dir=d, model=Path(model), pairs=pairs, empty=d / "empty.jsonl",
                           lora=lora, full=full)


# ---------------------------------------------------------------- 1. KL of the base against itself

def test_fresh_adapter_has_exactly_zero_kl_and_identical_samples(demo_run, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    base = modeling.load_model(str(demo_run.model))
    adapter = tmp_path / "fresh" / "adapter"  # no run_config.json here or one level up
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    task_type="CAUSAL_LM")).save_pretrained(adapter)
    out, samples = tmp_path / "report.json", tmp_path / "samples.jsonl"
    rc, _, err = run_eval(capsys, "--adapter", adapter, "--model", demo_run.model,
                          "--dataset", demo_run.dataset, "--split", "test",
                          "--out", out, "--samples", samples, "--generate", 2,
                          "--max-new-tokens", 6)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["pairs"] == 128
    assert report["kl/chosen"] == 0.0 and report["kl/rejected"] == 0.0
    assert report["kl/chosen_tokens"] > 0 and report["kl/rejected_tokens"] > 0
    assert report["policy"] == report["base"]  # every metric, bit for bit
    # the same seed for both models: identical samples and a sequence log-ratio of exactly 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["policy_ids"] == row["base_ids"] and row["log_ratio"] == 0.0
    assert report["kl/sequence"] == 0.0
    assert all(report[f"health/policy/{key}"] == report[f"health/base/{key}"]
               for key in ("length", "ended", "empty", "rep4", "distinct2"))


def test_trained_adapter_has_positive_kl(demo_eval):
    report = demo_eval.report
    assert report["kl/chosen"] > 1e-4 and report["kl/rejected"] > 1e-4
    assert report["policy"]["rewards/margins"] != report["base"]["rewards/margins"]


# ------------------------------------------------------ 2. token_kl is the exact full-vocabulary KL

def random_kl_case(B=4, T=9, H=8, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy_hidden, base_hidden = (torch.randn(B, T, H, generator=g),
                                  torch.randn(B, T, H, generator=g))
    policy_head = dict(lm_head_weight=torch.randn(V, H, generator=g),
                       lm_head_bias=torch.randn(V, generator=g),
                       logit_softcap=3.0)
    base_head = dict(lm_head_weight=torch.randn(V, H, generator=g), lm_head_bias=None,
                     logit_softcap=None)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = packing.IGNORE_INDEX   # prompt
    labels[0, -2:] = packing.IGNORE_INDEX  # right padding
    labels[2] = packing.IGNORE_INDEX       # a row with no response tokens
    return policy_hidden, base_hidden, policy_head, base_head, labels


def ref_token_kl(policy_hidden, base_hidden, policy_head, base_head, labels):
    """Explicit loops, float64: position t is scored when label t+1 is a response token."""
    def log_probs(h, head):
        logits = h.double() @ head["lm_head_weight"].double().T
        if head["lm_head_bias"] is not None:
            logits = logits + head["lm_head_bias"].double()
        if head["logit_softcap"] is not None:
            logits = head["logit_softcap"] * torch.tanh(logits / head["logit_softcap"])
        return logits.log_softmax(-1)
    sums, counts = [], []
    for b in range(labels.shape[0]):
        total, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != packing.IGNORE_INDEX:
                total += ref_kl(log_probs(policy_hidden[b, t], policy_head),
                                log_probs(base_hidden[b, t], base_head))
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.stack(sums), torch.tensor(counts)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_token_kl_matches_float64_reference(chunk_size):
    case = random_kl_case()
    kl, tokens = eval.token_kl(*case, chunk_size=chunk_size)
    want_kl, want_tokens = ref_token_kl(*case)
    assert want_kl[1] > 0.5  # the two random models really differ
    assert tokens.tolist() == want_tokens.tolist() == [4, 6, 0, 6]
    assert kl[2] == 0.0
    assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-6)


def test_token_kl_with_no_response_tokens_at_all():
    policy_hidden, base_hidden, policy_head, base_head, labels = random_kl_case()
    kl, tokens = eval.token_kl(policy_hidden, base_hidden, policy_head, base_head,
                               torch.full_like(labels, packing.IGNORE_INDEX), chunk_size=2)
    assert kl.tolist() == [0.0] * 4 and tokens.tolist() == [0] * 4


def test_token_kl_on_model_hidden_states_matches_full_logits(reference):
    """With the demo policy's real final hidden states (adapter on / off) and padding in the
    batch."""
    policy, pad_id = reference.policy, reference.tokenizer.pad_token_id
    batch = packing.padded_rows(reference.examples[:3], pad_id)
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.no_grad():
        policy_hidden, policy_head = modeling.final_hidden(policy, batch)
        p_logits = policy(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
        with policy.disable_adapter():
            base_hidden, base_head = modeling.final_hidden(policy, batch)
            b_logits = policy(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
        kl, tokens = eval.token_kl(policy_hidden, base_hidden, policy_head, base_head,
                                   batch["labels"], chunk_size=7)
    mask = batch["labels"][:, 1:] != packing.IGNORE_INDEX
    per_position = ref_kl(p_logits[:, :-1].double().log_softmax(-1),
                          b_logits[:, :-1].double().log_softmax(-1))
    want = torch.where(mask, per_position, 0).sum(-1)
    assert tokens.tolist() == mask.sum(-1).tolist()
    assert (want > 0).all()
    assert_close(kl.double(), want, rtol=1e-4, atol=1e-6)


def test_reported_kl_is_total_kl_over_total_tokens(demo_eval, reference):
    report = demo_eval.report
    for side in ("chosen", "rejected"):
        assert report[f"kl/{side}_tokens"] == reference.tokens[side]
        assert report[f"kl/{side}"] == pytest.approx(reference.kl[side] / reference.tokens[side],
                                                     rel=1e-4)


# ---------------------------------------------------------------- 3. reward accuracy, independently

def test_reward_accuracy_matches_independent_scoring(demo_eval, reference):
    report, logps = demo_eval.report, reference.logps
    for model in ("policy", "base"):
        chosen, rejected = (torch.tensor(logps[model, "chosen"]),
                            torch.tensor(logps[model, "rejected"]))
        assert report[model]["rewards/accuracies"] == (chosen > rejected).float().mean().item()
        assert report[model]["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
        assert report[model]["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
        beta, gamma = demo_eval.report["settings"]["beta"], demo_eval.report["settings"]["gamma"]
        loss = torch.nn.functional.softplus(-(beta * (chosen - rejected) - gamma)).mean().item()
        assert report[model]["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["policy"]["rewards/accuracies"] >= 0.9
    assert report["policy"]["rewards/accuracies"] > report["base"]["rewards/accuracies"]


def test_batch_and_chunk_size_do_not_change_the_numbers(demo_run, demo_eval, tmp_path, capsys):
    """128 pairs in batches of 3 (a short last batch) and KL chunks of 5 tokens: the same
    numbers."""
    out = tmp_path / "b3.json"
    rc, _, err = run_eval(capsys, "--adapter", demo_run.run, "--batch-size", 3, "--chunk-size", 5,
                          "--out", out)
    assert rc == 0, err
    report, default = json.loads(out.read_text()), demo_eval.report
    for model in ("policy", "base"):
        assert report[model]["rewards/accuracies"] == default[model]["rewards/accuracies"]
        assert report[model]["loss"] == pytest.approx(default[model]["loss"], rel=1e-5)
    for key in ("kl/chosen", "kl/rejected"):
        assert report[key] == pytest.approx(default[key], rel=1e-4)
    assert report["kl/chosen_tokens"] == default["kl/chosen_tokens"]


# --------------------------------------------------------------- 4. the run's defaults, checkpoints

def test_defaults_come_from_the_run(demo_run, demo_eval):
    report, config = demo_eval.report, demo_run.config
    assert set(report) >= {"policy", "base", "kl/chosen", "kl/rejected", "pairs", "settings"}
    assert report["pairs"] == 128  # the demo's held-out split, data/demo/test.jsonl
    settings = report["settings"]
    assert settings["model"] == config["model"] and settings["dataset"] == config["dataset"]
    assert (settings["beta"], settings["gamma"]) == (config["beta"], config["gamma"])
    assert ((settings["max_length"], settings["max_prompt_length"])
            == (config["max_length"], config["max_prompt_length"]))
    assert settings["load_in_4bit"] is False
    # nothing generated by default
    assert "health/policy/length" not in report and "kl/sequence" not in report
    assert not (demo_run.run / "samples.jsonl").exists()
    out = demo_eval.stdout
    assert "reward accuracy" in out and "KL" in out and "128" in out
    accuracy_line = next(line for line in out.splitlines() if line.startswith("reward accuracy"))
    assert accuracy_line.split()[-2:] == [f"{report['policy']['rewards/accuracies']:.3f}",
                                          f"{report['base']['rewards/accuracies']:.3f}"]


def test_checkpoint_folder_works_as_adapter(demo_run, demo_eval, capsys):
    checkpoint = demo_run.run / "checkpoint-64"
    assert not (checkpoint / "run_config.json").exists()
    rc, out, err = run_eval(capsys, "--adapter", checkpoint)
    assert rc == 0, err
    report = json.loads((checkpoint / "eval.json").read_text())
    assert report["pairs"] == 128 and report["settings"]["model"] == demo_run.config["model"]
    assert report["settings"]["max_length"] == demo_run.config["max_length"]
    assert report["kl/chosen"] > 0
    # it scored the checkpoint's adapter, not the final one; the base is the same model
    assert report["kl/chosen"] != demo_eval.report["kl/chosen"]
    assert report["base"]["rewards/accuracies"] == demo_eval.report["base"]["rewards/accuracies"]


# ---------------------------------------------------------------- 5. sampling

def test_generate_writes_samples_and_sequence_kl(demo_run, reference, tmp_path, capsys):
    out, samples = tmp_path / "report.json", tmp_path / "samples.jsonl"
    rc, stdout, err = run_eval(capsys, "--adapter", demo_run.run, "--generate", 3,
                               "--max-new-tokens", 32, "--out", out, "--samples", samples)
    assert rc == 0, err
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 3
    tokenizer, eos = reference.tokenizer, reference.tokenizer.eos_token_id
    prompts = {tokenizer.decode(e["prompt"]): e["prompt"] for e in reference.examples}
    assert len(prompts) == len(reference.examples)
    assert len({row["prompt"] for row in rows}) == 3
    for row in rows:
        assert {"prompt", "policy", "base", "policy_tokens", "base_tokens", "log_ratio"} <= set(row)
        assert row["prompt"] in prompts  # a held-out prompt
        for name in ("policy", "base"):
            ids = row[f"{name}_ids"]
            assert 1 <= row[f"{name}_tokens"] == len(ids) <= 32
            if eos in ids:  # counted up to and including the first EOS, nothing after it
                assert ids.index(eos) == len(ids) - 1
            else:
                assert len(ids) == 32
            assert row[name] == tokenizer.decode(ids, skip_special_tokens=True)
        # sequence log-ratio on the policy's own sample, recomputed from full logits in float64
        prompt, ids = prompts[row["prompt"]], row["policy_ids"]
        sequence, positions = prompt + ids, slice(len(prompt) - 1, len(prompt) + len(ids) - 1)
        targets = torch.tensor(ids).unsqueeze(1)
        log_p = full_logits(reference.policy, sequence)[positions].gather(1, targets).sum()
        with reference.policy.disable_adapter():
            log_q = full_logits(reference.policy, sequence)[positions].gather(1, targets).sum()
        assert row["log_ratio"] == pytest.approx((log_p - log_q).item(), abs=1e-4)
    # the EOS branch is exercised: the base model (built with a fixed seed, untouched by training)
    # stops early
    assert any(eos in row[f"{name}_ids"] for row in rows for name in ("policy", "base"))
    assert report["kl/sequence"] == pytest.approx(sum(r["log_ratio"] for r in rows) / 3)
    # health: answer lengths without the stop token, and the fraction that ended at one
    for name in ("policy", "base"):
        lengths = [r[f"{name}_tokens"] - r[f"{name}_ended"] for r in rows]
        assert report[f"health/{name}/length"] == pytest.approx(sum(lengths) / 3)
        ended = [r[f"{name}_ended"] == (eos in r[f"{name}_ids"]) for r in rows]
        assert all(ended)
        assert report[f"health/{name}/ended"] == pytest.approx(
            sum(r[f"{name}_ended"] for r in rows) / 3)
    assert report["samples"] == str(samples)
    assert "mean length (tokens)" in stdout and "per sampled sequence" in stdout


def sample_by_hand(model, prompt, seed, max_new_tokens, stop):
    """Plain multinomial sampling from the model's softmax, one full forward per token, no
    processors."""
    torch.manual_seed(seed)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        probs = full_logits(model, ids)[-1].float().exp()
        ids.append(torch.multinomial(probs, 1).item())
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


SAMPLING = SimpleNamespace(generate=5, seed=2, temperature=1.0, top_p=1.0, max_new_tokens=15)


@pytest.fixture(scope="module")
def hand_samples(tiny):
    """The prompts generation.generate_samples picks from the tiny model's held-out pairs, each
    sampled by hand with the seed it gives a batch of one (seed + position) and cut at the model's
    two stop tokens. Drawn once, from
    the plain model: a fresh LoRA adapter (B = 0) leaves its logits as they are."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    # EOS, and a second stop token
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]
    model = modeling.load_model(str(tiny.model)).eval()
    _, examples, _ = preferences.load_examples(tokenizer, tiny.pairs, "train", None, 0.5, 0, 64, 32)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SAMPLING.seed))
    expected = [sample_by_hand(model, examples[i]["prompt"], SAMPLING.seed + k,
                               SAMPLING.max_new_tokens, stop)
                for k, i in enumerate(order[:SAMPLING.generate].tolist())]
    # both stop tokens met, and the length cap (the seed is chosen so)
    assert {ids[-1] for ids in expected} >= set(stop)
    assert any(len(ids) == SAMPLING.max_new_tokens and ids[-1] not in stop for ids in expected)
    return SimpleNamespace(tokenizer=tokenizer, stop=stop, examples=examples, expected=expected)


# LoRA from peft's two classes, or none
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", "plain"])
def test_generate_ignores_the_models_generation_config(tiny, hand_samples, tmp_path, task_type):
    """transformers 5 fills a GenerationConfig's unset fields from the model's
    generation_config.json; a model whose file turns on every kind of logits processor must still be
    sampled from π alone: the same ids as a hand-written multinomial loop with the same seed, cut at
    the model's own stop tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    stop = hand_samples.stop
    model = modeling.load_model(str(tiny.model))
    model.generation_config = GenerationConfig(
        eos_token_id=stop, do_sample=True, temperature=0.3, top_k=3, top_p=0.5, min_p=0.2,
        typical_p=0.5, repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=4,
        bad_words_ids=[[20], [21]], suppress_tokens=[22, 23],
        exponential_decay_length_penalty=(2, 1.5))
    model.save_pretrained(tmp_path / "model")  # the fields above, in generation_config.json
    model = modeling.load_model(str(tmp_path / "model")).eval()
    assert (model.generation_config.repetition_penalty == 5.0
            and model.generation_config.eos_token_id == stop)
    if task_type != "plain":  # B = 0: the LoRA model's logits are the model's
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear",
                                                 task_type=task_type))
    samples = generation.generate_samples(
        model, lambda: contextlib.nullcontext(model), hand_samples.tokenizer, hand_samples.examples,
        SAMPLING.generate, SAMPLING.max_new_tokens, seed=SAMPLING.seed, batch_size=1)
    assert [s["policy_ids"] for s in samples] == hand_samples.expected
    assert [s["base_ids"] for s in samples] == hand_samples.expected


# ---------------------------------------------------------------- 6. bad input

def test_missing_adapter_folder(tmp_path, capsys):
    rc, _, err = run_eval(capsys, "--adapter", tmp_path / "no-such-run")
    assert_usage_error(rc, err, "no-such-run", "no such folder")


def test_adapter_from_a_different_base_model(demo_run, tiny, tmp_path, capsys):
    """The tiny run's adapter (hidden size 32) on the demo model (hidden size 64)."""
    rc, _, err = run_eval(capsys, "--adapter", tiny.lora, "--model", demo_run.model,
                          "--out", tmp_path / "r.json")
    assert_usage_error(rc, err, "does not fit", str(tiny.model))
    assert not (tmp_path / "r.json").exists()


def test_empty_dataset(demo_run, tiny, tmp_path, capsys):
    rc, _, err = run_eval(capsys, "--adapter", demo_run.run, "--dataset", tiny.empty,
                          "--split", "train", "--out", tmp_path / "r.json")
    assert_usage_error(rc, err, str(tiny.empty))
    assert not (tmp_path / "r.json").exists()


def test_every_pair_truncated_away(demo_run, tmp_path, capsys):
    rc, _, err = run_eval(capsys, "--adapter", demo_run.run, "--max-length", 4,
                          "--max-prompt-length", 4, "--out", tmp_path / "r.json")
    assert_usage_error(rc, err, "no pairs to evaluate")


def test_run_without_held_out_pairs_needs_split(tiny, capsys):
    assert json.loads((tiny.full / "run_config.json").read_text())["eval_fraction"] == 0.0
    rc, _, err = run_eval(capsys, "--adapter", tiny.full)
    assert_usage_error(rc, err, "--split")
    assert not (tiny.full / "eval.json").exists()


def test_no_run_config_takes_the_base_from_the_adapter_and_needs_dataset(demo_run, tmp_path,
                                                                          capsys):
    adapter = tmp_path / "bare"
    shutil.copytree(demo_run.run / "checkpoint-64", adapter)
    rc, _, err = run_eval(capsys, "--adapter", adapter, "--dataset", demo_run.dataset,
                          "--split", "test")
    assert rc == 0, err  # peft's adapter_config.json names the base model
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config,
                                                             "base_model_name_or_path": None}))
    rc, _, err = run_eval(capsys, "--adapter", adapter, "--dataset", demo_run.dataset,
                          "--split", "test")
    assert_usage_error(rc, err, "--model")
    rc, _, err = run_eval(capsys, "--adapter", adapter, "--model", demo_run.model,
                          "--split", "test")
    assert_usage_error(rc, err, "--dataset")


# ---------------------------------------------------------------- 7. full fine-tuning

def test_full_finetuning_run(tiny, tmp_path, capsys):
    assert (not (tiny.full / "adapter_config.json").exists()
            and (tiny.full / "config.json").is_file())
    out = tmp_path / "full.json"
    # pairs the run did not train on (it held none out of its own)
    held_out = demo.DATA_DIR / "test.jsonl"
    rc, _, err = run_eval(capsys, "--adapter", tiny.full, "--ref-model", tiny.model,
                          "--dataset", held_out, "--out", out)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["pairs"] == 128
    assert report["kl/chosen"] > 0 and report["kl/rejected"] > 0
    assert report["policy"]["logps/chosen"] != report["base"]["logps/chosen"]
    # the reference defaults to the run's --model: the same numbers
    out2 = tmp_path / "full-default-ref.json"
    rc, _, err = run_eval(capsys, "--adapter", tiny.full, "--dataset", held_out, "--out", out2)
    assert rc == 0, err
    again = json.loads(out2.read_text())
    assert again["kl/chosen"] == report["kl/chosen"] and again["base"] == report["base"]


# ------------------------------------------------------- held-out slice chosen as train.py chose it

def test_eval_fraction_run_scores_the_pairs_training_held_out(tiny, capsys):
    rc, _, err = run_eval(capsys, "--adapter", tiny.lora)
    assert rc == 0, err
    report = json.loads((tiny.lora / "eval.json").read_text())
    assert report["pairs"] == 6  # 25 % of 24
    logged = [json.loads(line) for line in (tiny.lora / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in logged if r["step"] == 0)  # a fresh adapter: the base model
    after = [r for r in logged if "eval/loss" in r][-1]
    assert after["step"] == 2
    for name, metrics in (("base", before), ("policy", after)):
        assert report[name]["rewards/accuracies"] == metrics["eval/rewards/accuracies"]
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert report[name][key] == pytest.approx(metrics[f"eval/{key}"], rel=1e-5)
    assert report["policy"]["loss"] != report["base"]["loss"]


# ---------------------------------------------------------------- bad flags and edge cases

@pytest.mark.parametrize("flags", [["--beta", "0"], ["--beta", "-1"], ["--gamma", "-1"],
                                   ["--chunk-size", "0"], ["--batch-size", "0"],
                                   ["--generate", "-1", "--max-new-tokens", "1"],
                                   ["--generate", "1", "--max-new-tokens", "0"],
                                   ["--generate", "1", "--temperature", "0"],
                                   ["--beta", "nan"], ["--gamma", "nan"], ["--temperature", "nan"],
                                   ["--max-prompt-length", "99999"]],
                         ids=lambda flags: " ".join(flags))
def test_bad_numeric_flags_are_usage_errors(tiny, tmp_path, capsys, flags):
    out = tmp_path / "r.json"
    rc, _, err = run_eval(capsys, "--adapter", tiny.lora, "--out", out,
                          "--samples", tmp_path / "s.jsonl", *flags)
    assert_usage_error(rc, err)
    assert not out.exists()


def test_out_in_a_missing_folder(tiny, tmp_path, capsys):
    """--out in a folder that does not exist yet: eval.py creates it and writes the report there."""
    out = tmp_path / "reports" / "r.json"
    rc, _, err = run_eval(capsys, "--adapter", tiny.lora, "--out", out)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["pairs"] == 6 and report["settings"]["out"] == str(out)


def test_full_model_without_run_config_takes_ref_model(tiny, tmp_path, capsys):
    """A fully fine-tuned model folder on its own (no run_config.json, so no --model to default to):
    --ref-model is the base. Its numbers are those of the run folder itself, whose base is the run's
    --model, the same model."""
    model = tmp_path / "models" / "policy"
    shutil.copytree(tiny.full, model,
                    ignore=shutil.ignore_patterns("run_config.json", "metrics.jsonl", "*.png"))
    pairs = tmp_path / "pairs.jsonl"  # not the run's training file, which it held nothing out of
    rows = (demo.DATA_DIR / "test.jsonl").read_text().splitlines(keepends=True)
    pairs.write_text("".join(rows[:16]))
    rc, _, err = run_eval(capsys, "--adapter", model, "--ref-model", tiny.model, "--dataset", pairs,
                          "--out", tmp_path / "alone.json")
    assert rc == 0, err
    rc, _, err = run_eval(capsys, "--adapter", tiny.full, "--dataset", pairs,
                          "--out", tmp_path / "run.json")
    assert rc == 0, err
    alone, run = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("alone", "run"))
    assert alone["settings"]["model"] is None and run["settings"]["model"] == str(tiny.model)
    for key in ("pairs", "policy", "base", "kl/chosen", "kl/rejected"):
        assert alone[key] == run[key], key
    assert alone["base"] != alone["policy"] and alone["kl/chosen"] > 0  # the base is not the policy


def test_empty_dataset_message_says_so(demo_run, tiny, tmp_path, capsys):
    rc, _, err = run_eval(capsys, "--adapter", demo_run.run, "--dataset", tiny.empty,
                          "--out", tmp_path / "r.json")
    assert_usage_error(rc, err, "no rows")


def test_token_kl_is_never_negative():
    g = torch.Generator().manual_seed(0)
    base_hidden = torch.randn(16, 40, 8, generator=g)
    policy_hidden = base_hidden + 1e-6 * torch.randn(16, 40, 8, generator=g)
    head = dict(lm_head_weight=torch.randn(50, 8, generator=g), lm_head_bias=None,
                logit_softcap=None)
    labels = torch.zeros(16, 40, dtype=torch.long)
    kl, _ = eval.token_kl(policy_hidden, base_hidden, head, head, labels)
    assert (kl >= 0).all(), kl


def test_run_trained_with_a_chat_template_file_that_is_gone(tiny, tmp_path, capsys):
    """A base model with no chat template of its own, trained with --chat-template <file>; the file
    is gone by the time eval.py runs. eval tokenizes with the run's template (its text is in
    run_config.json), so it scores the held-out pairs exactly as train.py did: the numbers train.py
    logged before and after."""
    base = tmp_path / "no-template"
    shutil.copytree(tiny.model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert modeling.load_tokenizer(str(base)).chat_template is None
    template = tmp_path / "template.jinja"
    template.write_text(demo.CHAT_TEMPLATE)
    run = tmp_path / "run"
    rc, _, err = quiet(train.main, ["--model", str(base), "--dataset", str(tiny.pairs),
                                    "--chat-template", str(template), "--eval-fraction", "0.25",
                                    "--max-steps", "1", "--lr", "1e-2", "--batch-size", "4",
                                    "--output-dir", str(run)])
    assert rc == 0, err
    template.unlink()
    rc, _, err = run_eval(capsys, "--adapter", run, "--out", tmp_path / "r.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, after = (next(r for r in logged if r["step"] == step and "eval/loss" in r)
                     for step in (0, 1))
    assert report["pairs"] == 6
    for name, metrics in (("base", before), ("policy", after)):
        assert report[name]["rewards/accuracies"] == metrics["eval/rewards/accuracies"]
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert report[name][key] == pytest.approx(metrics[f"eval/{key}"], rel=1e-5), (name, key)


# ---------------------------------------------------------------- 4-bit QLoRA base

def test_qlora_run_evaluates_on_its_4bit_base(demo_run, tmp_path, capsys):
    """A QLoRA run (nf4 base, on the CPU here) is evaluated on a 4-bit base too, read from
    run_config.json; the adapter changes the scores. Hidden size 64: bitsandbytes' CPU inference
    path needs in_features >= 64."""
    run = tmp_path / "qlora"
    rc, _, err = quiet(train.main, ["--model", str(demo_run.model),
                                    "--dataset", str(demo_run.dataset), "--split", "test",
                                    "--eval-fraction", "0.25", "--max-steps", "6",
                                    "--batch-size", "8", "--lr", "2e-3", "--load-in-4bit",
                                    "--max-length", "64", "--max-prompt-length", "32",
                                    "--output-dir", str(run)])
    assert rc == 0, err
    rc, _, err = run_eval(capsys, "--adapter", run)
    assert rc == 0, err
    report = json.loads((run / "eval.json").read_text())
    assert report["settings"]["load_in_4bit"] is True and report["pairs"] == 32
    assert report["kl/chosen"] > 0
    assert report["policy"]["rewards/margins"] != report["base"]["rewards/margins"]


# ---------------------------------------------------------------- what a newcomer ran into

def test_training_pairs_are_found_by_content_in_any_file(tiny, tmp_path, capsys):
    """A held-out file that repeats the run's training rows (here: all 24 rows of its data, 18 of
    them trained on) is flagged by the pairs' ids, not by its path."""
    copy = tmp_path / "looks-new.jsonl"
    copy.write_text(tiny.pairs.read_text())
    rc, out, err = run_eval(capsys, "--adapter", tiny.lora, "--dataset", copy,
                            "--out", tmp_path / "report.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pairs"] == 24 and report["training_pairs"] == 18
    assert "warning: 18 of these 24 pairs are pairs the run trained on" in out
    rc, out, err = run_eval(capsys, "--adapter", tiny.lora, "--out", tmp_path / "held.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "held.json").read_text())["training_pairs"] == 0
    assert "warning" not in out


def test_samples_go_beside_the_report(demo_run, tmp_path, capsys):
    """--out elsewhere: the run folder's samples.jsonl is left alone; one prompt reads as one."""
    before = {p.name for p in demo_run.run.iterdir()}
    rc, out, err = run_eval(capsys, "--adapter", demo_run.run, "--out", tmp_path / "report.json",
                            "--generate", 1, "--max-new-tokens", 4)
    assert rc == 0, err
    assert (tmp_path / "report-samples.jsonl").is_file()
    assert {p.name for p in demo_run.run.iterdir()} == before
    assert "1 prompt sampled, policy and base (up to 4 tokens):" in out
    assert "an unbiased estimate: noisy" in out
    assert "sampling" in err  # progress, batch by batch


def test_a_folder_that_is_not_a_run_is_said_first(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(tiny.pairs.read_text())
    rc, _, err = run_eval(capsys, "--adapter", data)
    assert_usage_error(rc, err, "neither a LoRA adapter nor a model folder")
    rc, _, err = run_eval(capsys, "--adapter", tiny.model)
    assert_usage_error(rc, err, "is a model folder with no run_config.json beside it: pass "
                                "--model and --dataset")
