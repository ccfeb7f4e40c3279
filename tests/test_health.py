"""Generation health during training (train.py --sample-every): the numbers per sampling round, a
warning when the policy degenerates, and a training result identical to a run without sampling."""
import json
import random
import shutil

import pytest
import torch
from test_train import adapter, error_line, metrics, run, small_args, standard_rows, write_jsonl

import checkpoints
import cli
import demo
import generation
import modeling
import preferences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32)


def test_sampling_rounds_log_health_and_change_nothing(model_dir, tmp_path, capsys):
    """Dropout on, so that any RNG the sampling drew would change the adapter."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(24))
    common = ["--max-steps", 4, "--eval-fraction", 0.25, "--lora-dropout", 0.2, "--lr", 1e-3]
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "plain", *common), capsys)
    assert code == 0, err
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "sampled", *common,
                                  "--sample-every", 2, "--sample-prompts", 3,
                                  "--sample-max-new-tokens", 8), capsys)
    assert code == 0, err
    plain, sampled = adapter(tmp_path / "plain"), adapter(tmp_path / "sampled")
    assert plain.keys() == sampled.keys()
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)
    rows = metrics(tmp_path / "sampled")
    # the base once before training, the policy at steps 2 and 4
    assert [r["step"] for r in rows if "health/base/length" in r] == [0]
    policy_rows = [r for r in rows if "health/policy/length" in r]
    assert [r["step"] for r in policy_rows] == [2, 4]
    for row in policy_rows:
        assert {"health/policy/rep4", "health/policy/ended", "health/policy/distinct2",
                "kl/sequence", "sample/seconds"} <= row.keys()
        assert 0 <= row["health/policy/rep4"] <= 1 and row["sample/seconds"] >= 0
    samples = (tmp_path / "sampled" / "samples" / "samples-step-4.jsonl").read_text().splitlines()
    assert len(samples) == 3
    # training's own metrics are the same numbers
    plain_rows = [r for r in metrics(tmp_path / "plain") if "loss" in r]
    assert [r["loss"] for r in plain_rows] == [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def collapse(model_dir, tmp_path_factory):
    return planted_collapse(model_dir, tmp_path_factory.mktemp("collapse"))


def planted_collapse(model_dir, folder):
    """Planted degeneration: every chosen answer repeats one word a dozen times. (peaked model
    folder, dataset)."""
    from transformers import AutoModelForCausalLM
    # A random model's logits are nearly flat (its lm_head, which LoRA leaves alone, is drawn at
    # std 0.02): scaled up, its next-token distributions are as peaked as a trained model's.
    peaked = folder / "model"
    shutil.copytree(model_dir, peaked)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(peaked)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        words = rng.sample(demo.WORDS, 3)
        rows.append({"prompt": "shout: " + " ".join(words), "chosen": " ".join(["APPLE"] * 12),
                     "rejected": " ".join(w.upper() for w in words)})
    return peaked, write_jsonl(folder / "pairs.jsonl", rows)


def test_a_policy_that_learns_to_repeat_is_flagged(collapse, tmp_path, capsys):
    """The held-out reward accuracy rises to 1, and only the samples say what happened."""
    peaked, dataset = collapse
    code, out, err = run(small_args(peaked, dataset, tmp_path / "run", "--max-steps", 12,
                                    "--lr", 1e-2, "--eval-fraction", 0.25, "--sample-every", 12,
                                    "--sample-prompts", 6, "--sample-max-new-tokens", 24), capsys)
    assert code == 0, err
    rows = metrics(tmp_path / "run")
    final = [r for r in rows if "health/policy/rep4" in r][-1]
    assert rows[-1]["eval/rewards/accuracies"] == 1.0
    assert final["health/policy/rep4"] > rows[0]["health/base/rep4"] + 0.5
    assert "step 12: warning: the policy's samples degenerate: repetition" in out + err


# ---------------------------------------------------------------- --stop-on-degeneration

def collapsing(collapse, out, *extra):
    """The planted collapse at a gentler lr: samples healthy at step 2, flagged from step 4."""
    peaked, dataset = collapse
    return small_args(peaked, dataset, out, "--max-steps", 12, "--lr", 3e-3, "--eval-fraction",
                      0.25, "--sample-every", 2, "--sample-prompts", 6, "--sample-max-new-tokens",
                      24, *extra)


def test_a_collapse_stops_at_the_second_flagged_round_with_the_last_healthy_model(
        collapse, tmp_path, capsys):
    from peft import PeftModel
    out = tmp_path / "run"
    code, _, err = run(collapsing(collapse, out, "--stop-on-degeneration", "--save-every", 1),
                       capsys)
    assert code == cli.DEGENERATED == 4, err
    line = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(line) == 1, err
    assert line[0].startswith("stopped: step 6: the policy's samples degenerate: far from the base"
                              " (KL "), line
    assert "> 0.1 nats per sampled token" in line[0]
    assert ("(2 sampling rounds in a row); the run folder's model is step 2's, the last whose "
            f"samples were healthy: python train.py --resume {out} continues from it") in line[0]
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], bool(r["degeneration"])) for r in rows if "degeneration" in r] == [
        (2, False), (4, True), (6, True)]
    assert (out / "curves.png").is_file()
    # the final save is step 2's; the later, collapsed checkpoints and the healthy copy are gone
    assert checkpoints.saved_steps(out) == {2: out}
    assert not (out / "checkpoint-healthy").exists()
    # the kept model samples, with the monitor's seed and prompts, what it sampled at step 2
    peaked, dataset = collapse
    tokenizer = modeling.load_tokenizer(str(out))
    _, held_out, _ = preferences.load_examples(tokenizer, dataset, "train", None, 0.25, 42, 32, 16)
    policy = PeftModel.from_pretrained(modeling.load_model(str(peaked)), str(out)).eval()
    samples = generation.generate_samples(policy, lambda: generation.without_adapter(policy),
                                          tokenizer, held_out, 6, 24, seed=42, sides=("policy",))
    logged = [json.loads(line) for line in
              (out / "samples" / "samples-step-2.jsonl").read_text().splitlines()]
    assert [s["policy_ids"] for s in samples] == [s["policy_ids"] for s in logged]
    # --resume continues from the kept step, here with a lower learning rate
    code, stdout, err = run(["--resume", out, "--lr", 1e-4], capsys)
    assert code == 0, err
    assert f"resuming from {out} (step 2)" in stdout
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 13))


def test_a_healthy_run_is_the_same_with_and_without_stop_on_degeneration(model_dir, tmp_path,
                                                                         capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(24))
    common = ["--max-steps", 4, "--eval-fraction", 0.25, "--lora-dropout", 0.2, "--lr", 1e-3,
              "--sample-every", 1, "--sample-prompts", 3, "--sample-max-new-tokens", 8]
    for name, extra in (("plain", []), ("guarded", ["--stop-on-degeneration"])):
        code, _, err = run(small_args(model_dir, dataset, tmp_path / name, *common, *extra),
                           capsys)
        assert code == 0, err
    plain, guarded = adapter(tmp_path / "plain"), adapter(tmp_path / "guarded")
    assert plain.keys() == guarded.keys()
    assert all(torch.equal(plain[k], guarded[k]) for k in plain)
    # the fallback is not needed once the run is done
    assert not (tmp_path / "guarded" / "checkpoint-healthy").exists()


def test_sampling_needs_held_out_prompts_and_lora(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "a", "--stop-on-degeneration"),
                       capsys)
    assert code == 2 and "--stop-on-degeneration acts on sampling rounds" in error_line(err)
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "a", "--sample-every", 1), capsys)
    assert code == 2 and "--eval-fraction" in err
    code, _, err = run(small_args(model_dir, dataset, tmp_path / "b", "--sample-every", 1, "--full",
                                  "--eval-fraction", 0.25), capsys)
    assert code == 2 and "needs LoRA" in err


@pytest.mark.parametrize("held_out", ["--eval-fraction", "--eval-split"])
def test_sampling_with_no_held_out_pair_left_is_refused_before_training(model_dir, tmp_path,
                                                                        held_out, capsys):
    """Every held-out pair left out (chosen == rejected): one line, exit 2, no run folder."""
    rows = standard_rows(8)
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", [row | {"rejected": row["chosen"]} for row in rows[:2]])
    options = ["--eval-split", "test"]
    if held_out == "--eval-fraction":
        # train.py holds out these 2 of 8 (--seed 42)
        order = list(range(8))
        random.Random(42).shuffle(order)
        for i in order[:2]:
            rows[i]["rejected"] = rows[i]["chosen"]
        folder = write_jsonl(tmp_path / "pairs.jsonl", rows)
        options = ["--eval-fraction", 0.25]
    code, _, err = run(small_args(model_dir, folder, tmp_path / "run", *options,
                                  "--sample-every", 1), capsys)
    assert code == 2 and "no held-out pair is left" in error_line(err)
    assert not (tmp_path / "run").exists()
