"""Never silently wrong on another architecture: the start-up check (modeling.choose_layout) on tiny
random models of the families users train, and the defects a review found on them.

Each family is saved as an ordinary model folder with the demo's tokenizer, so train.py and eval.py
load it as they would a hub model. The reference numbers are the model's own `logits`, computed
here.
"""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tokenize_pair
from test_train import error_line, metrics, run, small_args, standard_rows, write_jsonl

import demo
import eval as evaluate
import modeling
import packing
import parallel
import preferences
import train

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
# Weights drawn wider than the usual 0.02, so that tokens mix as strongly as in a trained model:
# with tiny weights a state leaking across pairs changes log-probs by only ~1e-6.
SHAPE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, initializer_range=0.5)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
# family -> (config, what choose_layout must decide: "packed", "padded" or "refused")
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**SHAPE), "packed"),
    # linear attention beside full attention: its recurrent state would run across the packed row
    "qwen3_next": (lambda: transformers.Qwen3NextConfig(
        **SHAPE, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        "padded"),
    # a short convolution beside attention
    "lfm2": (lambda: transformers.Lfm2Config(**{k: v for k, v in SHAPE.items() if k != "head_dim"},
                                             layer_types=["conv", "full_attention"]), "padded"),
    # a multimodal wrapper whose sliding window (4 tokens) is in text_config
    "gemma3": (lambda: transformers.Gemma3Config(
        text_config=dict(**SHAPE, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(**VISION, image_size=28, patch_size=14), mm_tokens_per_image=4),
        "padded"),
    # the same, with the final logit soft-cap in text_config
    "gemma4": (lambda: transformers.Gemma4Config(
        text_config=dict(**SHAPE, sliding_window=4, final_logit_softcapping=2.0,
                         layer_types=["sliding_attention", "full_attention"],
                         hidden_size_per_layer_input=4),
        vision_config=dict(**VISION, num_key_value_heads=1, head_dim=8), audio_config=None),
        "padded"),
    # ALiBi: the packed layout crashes in its bias, the padded one is exact
    "bloom": (lambda: transformers.BloomConfig(hidden_size=16, n_layer=2, n_head=2), "padded"),
    # get_decoder() answers with the model itself
    "llama4": (lambda: transformers.Llama4TextConfig(**SHAPE, moe_layers=[],
                                                     intermediate_size_mlp=32),
               "packed"),
    # NoPE layers whose query temperature reads the place in the row (floor_scale scaled down from
    # 8,192, so that rows of a 24-token run reach it)
    "llama4_tuned": (lambda: transformers.Llama4TextConfig(
        **SHAPE, moe_layers=[], intermediate_size_mlp=32, no_rope_layers=[0, 0], floor_scale=16,
        attn_scale=0.5, attention_chunk_size=128), "padded"),
    # local layers that window by place in the row (its `bias` buffer), the real window_size
    "gpt_neo": (lambda: transformers.GPTNeoConfig(
        hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
        window_size=256, max_position_embeddings=48, initializer_range=0.5), "padded"),
    # Mamba beside attention in every layer, and logits multiplied by model code: refused
    "falcon_h1": (lambda: transformers.FalconH1Config(
        **SHAPE, lm_head_multiplier=0.25, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8,
        mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8), "refused"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a model folder: the demo's tokenizer and a random model of that family (built on
    use)."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def folder(family):
        if family not in built:
            path = demo.build_tiny_model(root / family, hidden_size=16)
            tokenizer = modeling.load_tokenizer(path)
            config = FAMILIES[family][0]()
            ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            config.update(ids)
            config.get_text_config(decoder=True).update(ids)
            torch.manual_seed(0)
            for leftover in Path(path).glob("*.safetensors"):
                leftover.unlink()
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
            built[family] = path
        return built[family]
    return folder


@pytest.fixture(scope="module")
def examples(folders):
    tokenizer = modeling.load_tokenizer(folders("llama"))
    rows = standard_rows(6, seed=3)
    pairs = [preferences.to_pair(row, "row") for row in rows]
    return [tokenize_pair(tokenizer, p.prompt, p.chosen, p.rejected, 24, 12) for p in pairs]


def own_logps(model, examples):
    """The reference: each sequence alone through `model(...).logits`, averaged over its
    response."""
    logps = []
    for side in ("chosen", "rejected"):
        for e in examples:
            ids = torch.tensor([e["prompt"] + e[side]])
            logits = model(input_ids=ids).logits[0, len(e["prompt"]) - 1:-1].float().log_softmax(-1)
            logps.append(logits.gather(1, ids[0, len(e["prompt"]):, None]).mean())
    return torch.stack(logps).view(2, -1)


def load(folder):
    return modeling.add_lora(modeling.load_model(folder), train.parse_args(
        ["--model", folder, "--dataset", "x", "--lora-r", "4", "--lora-dropout", "0"])).eval()


@pytest.mark.parametrize("family", [f for f, (_, want) in FAMILIES.items() if want != "refused"])
@torch.no_grad()
def test_each_family_is_scored_as_the_model_itself_scores(family, folders, examples):
    model = load(folders(family))
    packed, line = modeling.choose_layout(model, 24)
    assert ("packed" if packed.packed else "padded") == FAMILIES[family][1], line
    # the config's own rule names the cause; the numbers alone would also send them to padded
    assert ("by place in the row" in line) == (family in ("gpt_neo", "llama4_tuned")), line
    assert "checked against the model's own logits" in line
    chosen, rejected = modeling.pair_logps(model, examples, 0, 3, packed)
    reference = own_logps(model, examples)
    torch.testing.assert_close(torch.stack([chosen, rejected]), reference, atol=1e-5, rtol=0)
    # only the chosen ids change: the rejected log-probs must not move (a recurrent state across the
    # pair would move them)
    other = [{**e, "chosen": [(t + 1) % 40 + 8 for t in e["chosen"]]} for e in examples]
    assert torch.equal(modeling.pair_logps(model, other, 0, 3, packed)[1], rejected)


@pytest.mark.parametrize("family, window_size", [("lfm2", None), ("gpt_neo", 8),
                                                 ("llama4_tuned", None)])
def test_the_check_itself_catches_what_the_config_does_not_say(family, window_size, folders,
                                                               monkeypatch):
    """A hybrid whose config says nothing about its layers, a window by place in the row, a query
    temperature by place in the row: with the config's rules off, the numbers of rows as long as
    a run builds still send each to padded rows."""
    model = load(folders(family))
    if window_size:
        for module in model.modules():
            if hasattr(module, "bias") and getattr(module, "attention_type", "") == "local":
                module.bias = torch.tril(module.bias) & ~torch.tril(module.bias, -window_size)
    monkeypatch.setattr(packing, "packing_problem", lambda *_: None)
    packed, line = modeling.choose_layout(model, 24)
    assert not packed.packed and "packed layout changes this model's numbers" in line


def test_gpt_neo_trains_at_max_length_equal_to_its_positions(folders, tmp_path, capsys):
    """Packed rows would pass GPT-Neo's 48 positions (its `bias` buffer) and crash: padded rows
    stay within them, with pairs as long as --max-length allows."""
    words = " ".join(demo.WORDS * 2)
    rows = [{"prompt": f"shout: {words}", "chosen": words.upper(), "rejected": words}] * 4
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = run(small_args(folders("gpt_neo"), dataset, tmp_path / "run", "--max-steps", 1,
                                    "--max-length", 48, "--max-prompt-length", 24), capsys)
    assert code == 0, err
    assert "batches: padded" in out and "checked against the model's own logits in" in out
    code, _, err = run(small_args(folders("gpt_neo"), dataset, tmp_path / "too-long",
                                  "--max-length", 49), capsys)
    assert code == 2 and "up to 49 tokens pass gpt_neo's 48 positions" in error_line(err)
    assert not (tmp_path / "too-long").exists()


def test_held_out_pairs_longer_than_training_pairs_are_checked_too(folders, tmp_path, capsys):
    """The check and the rows are built for the longest pair of both parts: held-out pairs past
    GPT-Neo's 48 positions are refused before any work, not a crash at the first evaluation."""
    words = " ".join(demo.WORDS * 2)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", standard_rows(4))
    write_jsonl(data / "test.jsonl", [{"prompt": "shout: apple", "chosen": words.upper(),
                                       "rejected": words}] * 2)
    code, _, err = run(small_args(folders("gpt_neo"), data, tmp_path / "run", "--max-steps", 1,
                                  "--eval-split", "test", "--max-length", 64), capsys)
    assert code == 2 and "pass gpt_neo's 48 positions" in error_line(err)


def test_the_check_runs_without_dropout_and_restores_the_mode(folders):
    """LoRA dropout 0.5 in train mode would move every number: the check must score in eval mode,
    and hand the model back in the mode it was given."""
    model = modeling.add_lora(modeling.load_model(folders("llama")), train.parse_args(
        ["--model", "x", "--dataset", "x", "--lora-r", "4", "--lora-dropout", "0.5"])).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # fresh LoRA B is zero: dropout on its input would change nothing
            torch.nn.init.normal_(parameter)
    layout, line = modeling.choose_layout(model, 24)
    assert layout.packed, line
    assert model.training and all(m.training for m in model.modules())


def test_longest_is_the_prompt_and_the_longer_response_over_all_parts():
    def examples(prompt, chosen, rejected):
        columns = {name: (np.zeros(sum(lengths), np.int32), np.cumsum([0, *lengths]))
                   for name, lengths in (("prompt", prompt), ("chosen", chosen),
                                         ("rejected", rejected), ("unscored", [2, 2]))}
        return preferences.Examples(columns, np.arange(2))
    train_set = examples([3, 5], [4, 1], [2, 7])
    assert preferences.longest(train_set) == 12
    assert preferences.longest(train_set, examples([9, 1], [2, 2], [8, 1])) == 17
    assert preferences.longest() == 1


def test_packed_rows_stay_within_the_models_positions(folders):
    config = modeling.text_config(load(folders("llama")))
    assert packing.packing_problem(config, 1024) is None  # rows of 2047 tokens in 2048 positions
    assert "rows of up to 2049 tokens pass llama's 2048" in packing.packing_problem(config, 1025)


def test_the_check_refuses_logits_changed_after_the_last_layer(folders):
    """A hook that moves one logit by 0.01 in float32: simpo's numbers would differ from the
    model's own by ~1e-3 per token, ten times the tolerance."""
    model = load(folders("llama"))
    head = model.get_output_embeddings()

    def nudge(module, inputs, output):
        return output + torch.nn.functional.one_hot(torch.tensor(3), output.shape[-1]) * 0.01
    head.register_forward_hook(nudge)
    with pytest.raises(modeling.UsageError, match="differ from the model's own logits"):
        modeling.choose_layout(model, 24)


def test_multimodal_lora_trains_the_language_model_only(folders, examples):
    """all-linear on Gemma-3: LoRA on the language model's linear layers, none in the vision tower,
    and every trainable tensor gets a gradient (DDP stops at one that does not)."""
    model = load(folders("gemma3")).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not [n for n in names if "vision" in n or "language_model" not in n]
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # fresh LoRA B is zero, and so would be every lora_A gradient
            torch.nn.init.normal_(parameter)
    args = train.parse_args(["--micro-batch-size", "2", "--max-length", "24",
                             "--max-prompt-length", "12"])
    train.train_step(train.PairScorer(model), examples, args, 0, packing.Layout(False, 24))
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["qwen3_next", "lfm2", "gemma3", "bloom"])
def test_train_two_steps_and_evaluate(family, folders, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(12))
    code, out, err = run(small_args(folders(family), dataset, tmp_path / "run", "--max-steps", 2,
                                    "--eval-fraction", 0.34, "--max-length", 24,
                                    "--lora-dropout", 0),
                       capsys)
    assert code == 0, err
    assert "batches: padded" in out
    assert evaluate.main(["--adapter", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    final = metrics(tmp_path / "run")[-1]  # train.py's own held-out numbers after the last step
    assert report["policy"]["loss"] == pytest.approx(final["eval/loss"], abs=1e-5)


def test_a_model_whose_logits_simpo_cannot_reproduce_is_refused(folders, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    # (peft refuses all-linear on Mamba's own layers)
    code, _, err = run(small_args(folders("falcon_h1"), dataset, tmp_path / "run", "--max-steps", 1,
                                  "--lora-target", "q_proj,v_proj"), capsys)
    line = error_line(err)
    assert code == 2 and "falcon_h1" in line and "model's own logits" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- defects 5-10 of the same review

@pytest.fixture(scope="module")
def finished_run(folders, tmp_path_factory):
    """A 2-step run with a held-out part and a checkpoint after step 1."""
    root = tmp_path_factory.mktemp("finished")
    dataset = write_jsonl(root / "pairs.jsonl", standard_rows(12))
    argv = small_args(folders("llama"), dataset, root / "run", "--max-steps", 2, "--save-every", 1,
                      "--eval-fraction", 0.34)
    assert train.main([str(a) for a in argv]) == 0
    return root / "run"


def test_resume_never_reads_trust_remote_code_from_the_run(finished_run, tmp_path, capsys):
    """A run folder whose config says trust_remote_code, pointing at a model that ships Python code:
    a plain `--resume` must not run that code."""
    model, marker = tmp_path / "custom", tmp_path / "ran"
    shutil.copytree(json.loads((finished_run / "run_config.json").read_text())["model"], model)
    (model / "custom_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom'\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom_model.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    config.update(trust_remote_code=True, model=str(model))
    (run_dir / "run_config.json").write_text(json.dumps(config))
    (run_dir / "checkpoint.json").unlink()  # unfinished: resume would load the model
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = run(["--resume", run_dir], capsys)
    assert code == 2 and "--trust-remote-code" in error_line(err)
    assert not marker.exists()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_mistral_prompt_end_is_never_scored():
    """Rows where one side's first token swallows the prompt's last "]" ("]["): the other side's
    bare "]" is read but not scored, and generation starts after the whole prompt."""
    folder = FIXTURES / "real-tokenizers" / "mistral-instruct"
    rows = FIXTURES / "real-data" / "ultrafeedback_trl_eval200.jsonl"
    if not folder.is_dir() or not rows.is_file():
        pytest.skip("real fixtures absent (../shared/fixtures)")
    tokenizer = modeling.load_tokenizer(str(folder))
    pairs = [preferences.to_pair(json.loads(line), "row") for line in rows.read_text().splitlines()]
    found = 0
    for i in (4, 149):
        example = tokenize_pair(tokenizer, *pairs[i][:3], 4096, 4000)
        for side, unscored in zip(("chosen", "rejected"), example["unscored"], strict=True):
            first = tokenizer.convert_ids_to_tokens(example[side][unscored])
            assert not first == "]", (i, side)  # the first scored token holds response text
            found += unscored
        labels = packing.padded_rows([example], 0)["labels"]
        scored = [len(example["chosen"]) - example["unscored"][0],
                  len(example["rejected"]) - example["unscored"][1]]
        assert (labels != packing.IGNORE_INDEX).sum(1).tolist() == scored
        prompt = tokenizer.decode(preferences.generation_prompt(example))
        assert prompt.endswith("[/INST]")
    assert found == 2
    # scored the same in both layouts, with a tiny model of the real vocabulary
    model = modeling.add_lora(
        transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(
            vocab_size=len(tokenizer), **SHAPE)),
        train.parse_args(["--lora-r", "4"])).eval()
    example = tokenize_pair(tokenizer, *pairs[4][:3], 96, 48)
    assert example["unscored"] == [1, 0]
    # the reference: "]" moved into the prompt, where it is read and not scored
    moved = {**example, "prompt": example["prompt"] + example["chosen"][:1],
             "chosen": example["chosen"][1:]}
    with torch.no_grad():
        reference = torch.cat([own_logps(model, [moved])[0], own_logps(model, [example])[1]])
        for packed in (True, False):
            logps = torch.cat(modeling.pair_logps(model, [example], 0, 1,
                                                       packing.Layout(packed, 96)))
            torch.testing.assert_close(logps, reference, atol=1e-5, rtol=0)


def test_eval_scores_with_the_template_the_run_trained_with(finished_run, tmp_path, capsys):
    base = json.loads((finished_run / "run_config.json").read_text())["model"]
    config = json.loads((finished_run / "run_config.json").read_text())
    # recorded although --chat-template was not passed
    assert config["chat_template"] == demo.CHAT_TEMPLATE
    # the base model's template edited after training: eval must keep the run's
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    (changed / "chat_template.jinja").write_text(demo.CHAT_TEMPLATE.replace("|> ", "|> apple "))
    assert modeling.load_tokenizer(str(changed)).chat_template != demo.CHAT_TEMPLATE
    argv = ["--adapter", str(finished_run), "--model", str(changed),
            "--out", str(tmp_path / "eval.json")]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "another chat template than the run trained with" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["policy"]["loss"] == pytest.approx(metrics(finished_run)[-1]["eval/loss"],
                                                     abs=1e-5)


def test_cached_ids_follow_python_side_tokenizer_settings(folders, tmp_path, monkeypatch):
    """split_special_tokens changes the ids and not the tokenizer's files: the cache must not serve
    the old ids, neither through the fingerprint nor when the fingerprint misses a setting."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(8))
    folder = folders("llama")

    def first_prompt(tokenizer):
        train_set, _, summary = preferences.load_examples(tokenizer, dataset, "train",
                                                          max_length=32, max_prompt_length=16)
        return train_set[0]["prompt"], summary.from_cache

    plain, _ = first_prompt(modeling.load_tokenizer(folder))
    assert first_prompt(modeling.load_tokenizer(folder)) == (plain, True)
    split = modeling.load_tokenizer(folder)
    split.split_special_tokens = True
    assert first_prompt(split)[0] != plain
    monkeypatch.setattr(preferences, "_tokenizer_state", lambda tokenizer: "blind")
    assert first_prompt(modeling.load_tokenizer(folder))[0] == plain
    ids, cached = first_prompt(split)  # same fingerprint, other ids: the check tokenizes anew
    assert ids != plain and not cached


def test_a_signal_landing_while_processes_agree_is_not_lost(folders, tmp_path, capsys, monkeypatch):
    """SIGTERM arrives after after_step has read its flag: the run must still stop (one step later)
    with a checkpoint, not train on until it is killed."""
    agree, calls = parallel.agree, []

    def agree_then_signal(*flags):
        result = agree(*flags)
        calls.append(flags)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(parallel, "agree", agree_then_signal)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(16))
    code, _, err = run(small_args(folders("llama"), dataset, tmp_path / "run", "--max-steps", 6,
                                  "--batch-size", 2, "--save-every-minutes", 0), capsys)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM after step 2: checkpoint saved" in err
    assert (tmp_path / "run" / "checkpoint-2" / "checkpoint.json").is_file()


def test_resume_keeps_whole_metrics_lines_and_drops_a_torn_one(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoint-2", ignore_errors=True)
    (run_dir / "checkpoint.json").unlink()  # as if the run had crashed after its step-1 checkpoint
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 0.6')
    code, _, err = run(["--resume", run_dir], capsys)
    assert code == 0, err
    steps = [row["step"] for row in metrics(run_dir)]
    assert steps == [0, 1, 2, 2]  # held-out at 0, steps 1 and 2, held-out at the end


@pytest.mark.parametrize("window", [2, 8, 20, 63])
def test_probe_pairs_cross_every_window_shorter_than_max_length(window):
    pairs = modeling.probe_pairs(50, 64)
    assert max(len(p["prompt"]) + len(p["chosen"]) for p in pairs) > window
    assert all(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= 64 for p in pairs)
    assert all(0 <= t < 50 for p in pairs for ids in p.values() for t in ids)
    assert modeling.probe_pairs(50, 64) == pairs  # seeded: the same check every time


def test_probe_pairs_build_the_longest_packed_row():
    """A row of packing.longest_row tokens, with the rejected tokens max_length − 1 places in the
    row after their positions: what a real row can reach."""
    batch = packing.build_batch(modeling.probe_pairs(50, 64), 0, packing.Layout(True, 64))
    assert batch["input_ids"].shape[1] == packing.longest_row(64) == 127
    places = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["position_ids"])
    rejected = batch["side"] == 2
    assert (places - batch["position_ids"])[rejected].max() >= 63
