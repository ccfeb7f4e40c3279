"""merge.py: a run becomes a plain model folder that from_pretrained loads with no peft, checked
against the adapter model before it is renamed into place; eval.py scores it as the run."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

import eval
import merge
import preferences
import train

ROOT = Path(__file__).resolve().parent.parent
# the demo's vocabulary, with turns ending in <|system|> instead of its EOS <|end|>: a template
# that is not the base tokenizer's, and an end-of-turn token that is not EOS
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|system|> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def quiet(fn, *args):
    """fn(*args) with stdout and stderr captured: (result, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn(*args)
    return result, out.getvalue(), err.getvalue()


def run_merge(*argv):
    return quiet(merge.main, [str(a) for a in argv])


def assert_usage_error(rc, err, *fragments, code=2):
    """The exit code, exactly one `error: ...` line on stderr, no traceback."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(parent):
    """What a merge left in --out's parent folder: hidden temporary folders."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def adapter_model(run, base, dtype=torch.float32):
    """The run's adapter applied unmerged on its base, as an independent reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(run)).eval()


def held_out(run_folder, count=8):
    """Token ids (prompt + chosen) of the first held-out pairs of a run, as train.py made them."""
    config = json.loads((run_folder / "run_config.json").read_text())
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(run_folder)
    _, examples, _ = preferences.load_examples(
        tokenizer, config["dataset"], config["split"], config["eval_split"],
        config["eval_fraction"], config["seed"], config["max_length"], config["max_prompt_length"])
    return [examples[i]["prompt"] + examples[i]["chosen"] for i in range(count)]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def merged(demo_run, tmp_path_factory):
    """The demo run merged with the defaults (bfloat16) and in float32."""
    folder = tmp_path_factory.mktemp("merged")
    outs = {}
    for dtype in ("bfloat16", "float32"):
        outs[dtype] = folder / f"demo-{dtype}"
        rc, out, err = run_merge("--adapter", demo_run.run, "--out", outs[dtype],
                                 *(["--dtype", dtype] if dtype == "float32" else []))
        assert rc == 0, err
        outs[dtype + "_stdout"] = out
    return SimpleNamespace(bf16=outs["bfloat16"], f32=outs["float32"],
                           bf16_stdout=outs["bfloat16_stdout"], f32_stdout=outs["float32_stdout"])


@pytest.fixture(scope="module")
def qlora_run(demo_run, tmp_path_factory):
    """A 4-bit QLoRA run on the CPU (hidden size 64: bitsandbytes' CPU path needs in_features >= 64)
    with a chat template of its own, holding out a quarter of its pairs; then merged."""
    folder = tmp_path_factory.mktemp("qlora")
    run = folder / "qlora"
    rc, _, err = quiet(train.main, ["--model", str(demo_run.model),
                                    "--dataset", str(demo_run.dataset), "--split", "test",
                                    "--eval-fraction", "0.25", "--max-steps", "6",
                                    "--batch-size", "8", "--lr", "2e-3", "--load-in-4bit",
                                    "--chat-template", TEMPLATE, "--max-length", "64",
                                    "--max-prompt-length", "32", "--output-dir", str(run)])
    assert rc == 0, err
    out = folder / "qlora-merged"
    rc, stdout, err = run_merge("--adapter", run, "--out", out)
    assert rc == 0, err
    return SimpleNamespace(run=run, out=out, stdout=stdout)


# ---------------------------------------------------------------- the merged folder

def test_merged_folder_loads_with_peft_blocked(merged):
    """A plain model folder: no adapter files, safetensors weights in the default bfloat16, no
    quantization; from_pretrained in a process where `import peft` fails finds every weight."""
    out = merged.bf16
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, "
            "output_loading_info=True)\n"
            "assert not any(info.values()), info\n"
            "print(next(model.parameters()).dtype)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch.bfloat16"


def test_merged_logits_equal_the_adapter_models(demo_run, merged):
    """Full logits on held-out sequences: the float32 merge equals the adapter applied unmerged on
    the float32 base to float32 rounding; the bf16 merge's log-probs are within its tolerance."""
    from transformers import AutoModelForCausalLM
    reference = adapter_model(demo_run.run, demo_run.model)
    merged_f32 = AutoModelForCausalLM.from_pretrained(merged.f32).eval()
    merged_bf16 = AutoModelForCausalLM.from_pretrained(merged.bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        for ids in held_out(demo_run.run):
            ids = torch.tensor([ids])
            expected = reference(input_ids=ids).logits
            assert_close(merged_f32(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
            got = merged_bf16(input_ids=ids).logits.log_softmax(-1)
            difference = (got - expected.log_softmax(-1)).abs().max().item()
            assert difference < merge.TOLERANCE[torch.bfloat16], difference
            # the adapter's own effect is far larger: the merge carries it
            with reference.disable_adapter():
                base = reference(input_ids=ids).logits.log_softmax(-1)
            assert (base - expected.log_softmax(-1)).abs().max().item() > 10 * difference


def test_merge_prints_the_check_and_records_it(demo_run, merged):
    for out, stdout, tolerance in ((merged.bf16, merged.bf16_stdout, 0.2),
                                   (merged.f32, merged.f32_stdout, 1e-4)):
        line = next(line for line in stdout.splitlines() if line.startswith("check on "))
        assert "16 pairs, split 'test'" in line and "held out by the run" in line
        assert f"tolerance {tolerance:g}" in line
        record = json.loads((out / "merged_from.json").read_text())
        assert record["check"]["tolerance"] == tolerance
        assert record["check"]["max_difference"] <= tolerance
        assert record["check"]["adapter_effect"] > 3 * tolerance
        assert record["model"] == str(demo_run.model) and record["run"] == str(demo_run.run)
        assert record["run_config"]["dataset"] == demo_run.config["dataset"]
        assert "trained_4bit" not in record and "4-bit" not in stdout
        assert f"wrote {out}" in stdout.splitlines()[-1]
    assert merged.f32_stdout.count("max |difference|") == 1
    difference = json.loads((merged.f32 / "merged_from.json").read_text())["check"]
    assert difference["max_difference"] < 1e-5


def test_tokenizer_and_generation_config_are_the_runs(demo_run, merged):
    from transformers import AutoTokenizer, GenerationConfig
    tokenizer = AutoTokenizer.from_pretrained(merged.bf16)
    assert tokenizer.chat_template == demo_run.config["chat_template"]
    eos = GenerationConfig.from_pretrained(merged.bf16).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|end|>") in eos


# ---------------------------------------------------------------- QLoRA

def test_qlora_run_merges_in_16bit_and_reports_both_differences(qlora_run):
    out = qlora_run.out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.bfloat16}
    record = json.loads((out / "merged_from.json").read_text())
    assert record["check"]["max_difference"] <= merge.TOLERANCE[torch.bfloat16]
    assert "held out" in record["check"]["pairs"] and record["check"]["pairs"].startswith("16 ")
    trained = record["trained_4bit"]
    assert 0 < trained["mean_difference"] <= trained["max_difference"] < 1
    line = next(line for line in qlora_run.stdout.splitlines() if line.startswith("4-bit base"))
    assert f"max |difference| {trained['max_difference']:.2g}, " in line
    assert f"mean {trained['mean_difference']:.2g} per token" in line
    assert "the shipped model is the merge into the 16-bit base" in qlora_run.stdout


def test_qlora_merge_keeps_the_runs_template_and_end_of_turn(demo_run, qlora_run):
    from transformers import AutoTokenizer, GenerationConfig
    tokenizer = AutoTokenizer.from_pretrained(qlora_run.out)
    base = AutoTokenizer.from_pretrained(demo_run.model)
    assert base.chat_template != TEMPLATE and tokenizer.chat_template == TEMPLATE
    eos = GenerationConfig.from_pretrained(qlora_run.out).eos_token_id
    # the template's end of turn, and the model's own EOS still
    assert set(eos) == {tokenizer.convert_tokens_to_ids("<|system|>"), base.eos_token_id}


# ---------------------------------------------------------------- eval.py on the merged folder

def test_eval_scores_the_merged_model_as_the_adapter_run(demo_run, merged, tmp_path, capsys):
    """`eval.py --model MERGED --ref-model BASE` reads the run's settings from merged_from.json and
    scores its held-out pairs: the adapter run's numbers, within the merge's tolerance."""
    reports = {}
    for name, argv in (("adapter", ["--adapter", demo_run.run]),
                       ("merged", ["--model", merged.f32, "--ref-model", demo_run.model]),
                       ("merged-bf16", ["--model", merged.bf16, "--ref-model", demo_run.model])):
        rc = eval.main([str(a) for a in argv] + ["--out", str(tmp_path / f"{name}.json")])
        assert rc == 0, capsys.readouterr().err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    adapter = reports["adapter"]
    beta = demo_run.config["beta"]
    for name, tolerance in (("merged", 1e-4), ("merged-bf16", 0.2)):
        report = reports[name]
        assert report["pairs"] == adapter["pairs"] == 128 and report["scored"] == adapter["scored"]
        assert report["base"] == adapter["base"]
        policy, expected = report["policy"], adapter["policy"]
        for key in ("logps/chosen", "logps/rejected"):
            assert abs(policy[key] - expected[key]) <= tolerance, key
        # the loss moves by at most 2β × the log-prob difference
        assert abs(policy["loss"] - expected["loss"]) <= 2 * beta * tolerance
        assert policy["rewards/accuracies"] == expected["rewards/accuracies"]
        assert abs(report["kl/chosen"] - adapter["kl/chosen"]) <= tolerance
    # without --out, the report goes into the model folder
    rc = eval.main(["--model", str(merged.f32), "--ref-model", str(demo_run.model)])
    assert rc == 0
    assert json.loads((merged.f32 / "eval.json").read_text())["pairs"] == 128


def test_eval_without_adapter_needs_model_and_ref_model(demo_run, merged, capsys):
    for argv in (["--model", merged.f32], ["--ref-model", demo_run.model], []):
        rc = eval.main([str(a) for a in argv])
        assert_usage_error(rc, capsys.readouterr().err, "--ref-model")
    rc = eval.main(["--model", str(demo_run.run), "--ref-model", str(demo_run.model)])
    assert_usage_error(rc, capsys.readouterr().err, "is a LoRA adapter", "--adapter")


# ---------------------------------------------------------------- nothing half-written

def test_crash_while_saving_leaves_nothing(demo_run, tmp_path, monkeypatch):
    """The tokenizer's save raises after the weights are written: no --out, no leftover."""
    from transformers import PreTrainedTokenizerBase

    def disk_full(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    out = tmp_path / "models" / "merged"
    with pytest.raises(OSError, match="No space left"):
        quiet(merge.main, ["--adapter", str(demo_run.run), "--out", str(out)])
    assert not out.exists() and leftovers(out.parent) == []


def test_killed_while_saving_leaves_no_complete_folder(demo_run, tmp_path):
    """The process dies (no cleanup runs) once the weights are written: --out does not exist, the
    hidden temporary folder has no merged_from.json, and the next merge removes it."""
    out = tmp_path / "merged"
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import transformers, merge\n"
            "save = transformers.PreTrainedModel.save_pretrained\n"
            "def dies(self, *args, **kwargs):\n"
            "    save(self, *args, **kwargs)\n"
            "    os._exit(9)\n"
            "transformers.PreTrainedModel.save_pretrained = dies\n"
            f"merge.main(['--adapter', {str(demo_run.run)!r}, '--out', {str(out)!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 9, result.stderr
    assert not out.exists()
    [partial] = leftovers(tmp_path)
    assert (tmp_path / partial / "model.safetensors").is_file()
    assert not (tmp_path / partial / "merged_from.json").exists()
    rc, _, err = run_merge("--adapter", demo_run.run, "--out", out, "--check-pairs", "2")
    assert rc == 0, err
    assert (out / "merged_from.json").is_file() and leftovers(tmp_path) == []


def test_a_merge_that_fails_the_check_writes_nothing(demo_run, tmp_path, monkeypatch):
    """A merge whose weights are not the adapter model's (planted: one projection scaled) is refused
    in one line, exit code 1, and leaves nothing at --out."""
    real_merge = merge.merge_into_base

    def wrong_merge(policy):
        model = real_merge(policy)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(merge, "merge_into_base", wrong_merge)
    out = tmp_path / "merged"
    rc, stdout, err = run_merge("--adapter", demo_run.run, "--out", out, "--dtype", "float32")
    assert_usage_error(rc, err, "differs from the adapter model", "tolerance 0.0001",
                       "nothing written", code=1)
    assert "check on" in stdout
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- other folders

def test_full_run_is_already_a_model_folder(demo_run, tmp_path):
    """A --full run's folder (a model folder, no adapter): one line, exit 0, nothing written."""
    out = tmp_path / "merged"
    rc, stdout, err = run_merge("--adapter", demo_run.model, "--out", out)
    assert rc == 0, err
    assert stdout.strip() == (f"{demo_run.model} is a full fine-tuning run, already a plain model "
                              f"folder: AutoModelForCausalLM.from_pretrained('{demo_run.model}') "
                              f"loads it; nothing to merge")
    assert not out.exists()


def test_folders_that_are_not_runs(demo_run, tmp_path):
    for folder, fragment in ((demo_run.dataset, "not a run"), (tmp_path / "gone", "no such")):
        rc, _, err = run_merge("--adapter", folder, "--out", tmp_path / "merged")
        assert_usage_error(rc, err, str(folder), fragment)
    # a run still training: its newest checkpoint is named
    run = tmp_path / "unfinished"
    shutil.copytree(demo_run.run / "checkpoint-64", run / "checkpoint-64")
    shutil.copy(demo_run.run / "run_config.json", run)
    rc, _, err = run_merge("--adapter", run, "--out", tmp_path / "merged")
    assert_usage_error(rc, err, "no final save yet", str(run / "checkpoint-64"))
    assert not (tmp_path / "merged").exists()


def test_existing_out_is_refused_unless_it_is_a_merge_and_overwrite_is_given(demo_run, merged,
                                                                            tmp_path):
    # a folder merge.py did not write is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_merge("--adapter", demo_run.run, "--out", other, *extra)
        assert_usage_error(rc, err, "not empty", "merged_from.json")
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
    # nor the run folder itself
    rc, _, err = run_merge("--adapter", demo_run.run, "--out", demo_run.run, "--overwrite")
    assert_usage_error(rc, err, "not empty")
    # an earlier merge: only with --overwrite
    out = tmp_path / "merged"
    shutil.copytree(merged.bf16, out)
    (out / "eval.json").write_text("{}")
    rc, _, err = run_merge("--adapter", demo_run.run, "--out", out)
    assert_usage_error(rc, err, "--overwrite")
    rc, _, err = run_merge("--adapter", demo_run.run, "--out", out, "--overwrite",
                           "--check-pairs", "2")
    assert rc == 0, err
    assert not (out / "eval.json").exists() and leftovers(tmp_path) == []
    assert json.loads((out / "merged_from.json").read_text())["check"]["pairs"].startswith("2 ")


def test_the_check_scores_the_pairs_the_run_held_out(demo_run, tmp_path, monkeypatch):
    """A run that held out a fraction of its split: every model the check scores is scored on the
    first of those pairs (the ones eval.py scores), not on training pairs."""
    from transformers import AutoTokenizer
    run = tmp_path / "fraction"
    shutil.copytree(demo_run.run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = demo_run.config | {"split": "test", "eval_split": None, "eval_fraction": 0.25}
    (run / "run_config.json").write_text(json.dumps(config))
    scored = []
    real_logps = merge.logps

    def recording(model, examples, *args):
        scored.append([examples[i] for i in range(len(examples))])
        return real_logps(model, examples, *args)

    monkeypatch.setattr(merge, "logps", recording)
    rc, stdout, err = run_merge("--adapter", run, "--out", tmp_path / "merged",
                                "--check-pairs", "3", "--dtype", "float32")
    assert rc == 0, err
    assert "check on 3 pairs, the pairs the run held out of" in stdout
    tokenizer = AutoTokenizer.from_pretrained(demo_run.model)
    _, held, _ = preferences.load_examples(tokenizer, config["dataset"], "test", None, 0.25,
                                           config["seed"], config["max_length"],
                                           config["max_prompt_length"])
    # the adapter model, the base, the merged model
    assert len(scored) == 3 and all(pairs == [held[i] for i in range(3)] for pairs in scored)


def test_checkpoint_and_a_run_without_held_out_pairs(demo_run, tmp_path):
    """A checkpoint-N folder merges (its run_config.json is one folder up); a run that held out
    nothing is checked on its first training pairs, and says so."""
    rc, _, err = run_merge("--adapter", demo_run.run / "checkpoint-64", "--out", tmp_path / "ckpt",
                           "--check-pairs", "2")
    assert rc == 0, err
    record = json.loads((tmp_path / "ckpt" / "merged_from.json").read_text())
    assert record["run"] == str(demo_run.run / "checkpoint-64")
    assert record["run_config"]["eval_split"] == "test"
    run = tmp_path / "no-held-out"
    shutil.copytree(demo_run.run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = demo_run.config | {"eval_split": None}
    (run / "run_config.json").write_text(json.dumps(config))
    rc, stdout, err = run_merge("--adapter", run, "--out", tmp_path / "merged",
                                "--check-pairs", "3")
    assert rc == 0, err
    assert "check on 3 pairs, training pairs of" in stdout and "the run held out none" in stdout
