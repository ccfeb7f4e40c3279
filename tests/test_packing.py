"""The packed layout (each prompt computed once, no padding; packing.build_batch) gives exactly
what the padded layout of packing.padded_rows gives: log-probs, SimPO losses and LoRA gradients
(float32, CPU, 1e-5), and models whose attention cannot take it fall back to the padded layout.

The reference is today's padded computation written out here from packing.padded_rows, not the code
under test. lora_B is random, so that every LoRA tensor's gradient is compared, and the step's
gradient is also compared with a float64 one written out from the paper (a uniform factor would pass
every layout comparison).
"""
import argparse
import copy
import json
import random

import numpy as np
import pytest
import torch
from conftest import tokenize_pair

import demo
import modeling
import packing
import preferences
import simpo
import train

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target="all-linear")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return modeling.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Ragged pairs as preferences.py tokenizes them, as two groups: (max length 24, prompt 12),
    where two prompts lose their start, and (24, 24), where those two prompts leave no room for a
    response and their pairs are skipped. Every other pair's ids are a numpy array, as the Arrow
    pipeline gives them."""
    rng = random.Random(0)
    rows = demo.make_pairs([rng.sample(demo.WORDS, rng.randint(1, 5)) for _ in range(7)], rng)
    rows[2]["prompt"] = "shout: " + " ".join(demo.WORDS[:20])  # 24+ prompt tokens
    rows[5]["prompt"] = "whisper: " + " ".join(demo.WORDS * 2)  # ~50 prompt tokens
    pairs = [preferences.to_pair(row, f"row {i}") for i, row in enumerate(rows)]

    def tokenize(max_length, max_prompt_length):  # (kept pairs, skipped count)
        examples = [tokenize_pair(tokenizer, p.prompt, p.chosen, p.rejected, max_length,
                                       max_prompt_length) for p in pairs]
        return [e for e in examples if e is not None], examples.count(None)

    truncated, skipped = tokenize(24, max_prompt_length=12)
    for i in (2, 5):  # truncated to 12 prompt tokens
        whole = tokenize_pair(tokenizer, pairs[i].prompt, pairs[i].chosen, pairs[i].rejected,
                              999, 999)
        assert len(truncated[i]["prompt"]) == 12 < len(whole["prompt"])
    assert skipped == 0
    rest, skipped = tokenize(24, max_prompt_length=24)
    assert skipped == 2 and len(rest) == 5
    kept = truncated + rest
    assert len({len(e["prompt"]) + len(e["chosen"]) for e in kept}) > 2  # ragged
    return [{k: np.asarray(v) if i % 2 else v for k, v in e.items()} for i, e in enumerate(kept)]


def tiny_model(config_class=None, vocab_size=64, seed=0, **config):
    """A 2-layer, hidden-32 model of any architecture (Llama by default), with LoRA, in train
    mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config((config_class or LlamaConfig)(**shape, **config))
    return randomise_lora_b(modeling.add_lora(model, argparse.Namespace(**LORA)).train(), seed)


def randomise_lora_b(model, seed=0):
    """peft starts lora_B at zero, which makes every lora_A gradient exactly zero: a comparison of
    gradients would then compare half its tensors as 0 == 0. Random B (as after some training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def train_args(**kw):
    return argparse.Namespace(**{**dict(micro_batch_size=3, no_length_normalization=False, beta=2.0,
                                        gamma=0.5, sft_weight=0.0, max_length=24), **kw})


def lora_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def padded_reference(model, examples, args, pad_id, full_logits=False):
    """The padded computation: packing.padded_rows, then chunked (or full-logit)
    log-probs. Returns the per-pair (losses, chosen logps, rejected logps), the token count and the
    LoRA gradients."""
    average, stats, tokens = not args.no_length_normalization, [], 0
    lists = [{k: [int(t) for t in v] for k, v in e.items()} for e in examples]
    for i in range(0, len(lists), args.micro_batch_size):
        batch = packing.padded_rows(lists[i:i + args.micro_batch_size], pad_id)
        if full_logits:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            logps = simpo.sequence_logps(logits, batch["labels"], average)
        else:
            hidden, head = modeling.final_hidden(model, batch)
            logps = simpo.chunked_sequence_logps(hidden, labels=batch["labels"], average=average,
                                                 chunk_size=5, **head)
        chosen, rejected = logps.chunk(2)
        losses = simpo.simpo_loss(chosen, rejected, args.beta, args.gamma)[0]
        (losses.sum() / len(lists)).backward()
        stats.append(torch.stack([losses, chosen, rejected]).detach())
        tokens += batch["attention_mask"].sum()
    return torch.cat(stats, 1), tokens, lora_grads(model)


def assert_same_as_padded(model, examples, args, pad_id, full_logits=False):
    reference, ref_tokens, ref_grads = padded_reference(model, examples, args, pad_id, full_logits)
    packed = modeling.choose_layout(model, args.max_length)[0]
    stats, tokens = train.train_step(train.PairScorer(model), examples, args, pad_id, packed)
    grads = lora_grads(model)
    # losses, chosen, rejected
    torch.testing.assert_close(stats[[0, 2, 3]], reference, atol=1e-5, rtol=0)
    assert tokens.item() == ref_tokens.item()  # prompt + response of both sequences, never padding
    assert grads.keys() == ref_grads.keys()
    assert all(g.abs().max() > 0 for g in grads.values())  # every LoRA tensor's gradient, A and B
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("full_logits", [False, True])
def test_packed_layout_equals_padded(examples, tokenizer, attention, average, full_logits):
    model = tiny_model(vocab_size=len(tokenizer), attn_implementation=attention)
    args = train_args(no_length_normalization=not average)
    # the packed layout is used
    assert packing.packing_problem(modeling.text_config(model), args.max_length) is None
    assert_same_as_padded(model, examples, args, tokenizer.pad_token_id, full_logits)


def float64_step_gradients(model, examples, args):
    """The gradient of one optimizer step, written out from the paper rather than from the code
    under test: a float64 copy of the model, each sequence alone (no padding, no packing), full
    logits, and the mean over the step's pairs of -log σ(β·(chosen - rejected) - γ) plus sft_weight
    × the chosen NLL per token."""
    model = copy.deepcopy(model).double()
    average, losses = not args.no_length_normalization, []
    for example in examples:
        prompt, logps, nll = [int(t) for t in example["prompt"]], [], None
        for side in ("chosen", "rejected"):
            response = [int(t) for t in example[side]]
            ids = torch.tensor([prompt + response])
            # the logits at position t predict token t + 1: the response, from len(prompt) - 1 on
            log_probs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            total = log_probs.gather(1, torch.tensor(response)[:, None]).sum()
            logps.append(total / len(response) if average else total)
            nll = -total / len(response) if nll is None else nll
        margin = args.beta * (logps[0] - logps[1]) - args.gamma
        losses.append(-torch.nn.functional.logsigmoid(margin) + args.sft_weight * nll)
    torch.stack(losses).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("average, sft_weight", [(True, 0.0), (False, 0.5)])
def test_step_gradient_equals_a_float64_reference(examples, tokenizer, average, sft_weight):
    """train.train_step, micro-batches of 3 in the packed layout: its gradient is the mean
    over the step's pairs, not a multiple of it (Adam would hide a uniform factor in the update)."""
    model = tiny_model(vocab_size=len(tokenizer))
    args = train_args(no_length_normalization=not average, sft_weight=sft_weight)
    reference = float64_step_gradients(model, examples, args)
    train.train_step(train.PairScorer(model), examples, args, tokenizer.pad_token_id,
                     packing.Layout(True, args.max_length))
    grads = lora_grads(model)
    assert grads.keys() == reference.keys()
    assert all(g.abs().max() > 0 for g in grads.values())
    for name in grads:  # float32 against float64: to 1e-4 of each tensor's largest entry
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(grads[name].double(), reference[name], rtol=0, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_packed_layout_rows_and_positions():
    """Hand-built pairs: rows bounded by 1.5 × max_length and padded only at their ends, positions
    of the rejected response continuing from the prompt, each token scored from the hidden state
    before it."""
    examples = [dict(prompt=[1, 2], chosen=[3, 4, 5], rejected=np.array([6])),
                dict(prompt=np.array([7]), chosen=[8], rejected=[9, 10]),
                dict(prompt=[11, 12, 13], chosen=[14, 15], rejected=[16, 17])]
    # rows of 7 tokens at most
    batch = packing.build_batch(examples, 0, packing.Layout(True, 5))
    # longest first: pair 2 (7 tokens) alone, then pairs 0 (6) and 1 (4) cannot share a row of 7
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 16, 17], [1, 2, 3, 4, 5, 6, 0],
                                           [7, 8, 9, 10, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert batch["position_ids"][1, :6].tolist() == [0, 1, 2, 3, 4, 2]
    width = 7
    predictors = batch["score_index"] % width
    rows = batch["score_index"] // width
    by_sequence = {s: (rows[batch["sequence"] == s].tolist(),
                       predictors[batch["sequence"] == s].tolist(),
                       batch["targets"][batch["sequence"] == s].tolist()) for s in range(6)}
    assert by_sequence[0] == ([1, 1, 1], [1, 2, 3], [3, 4, 5])      # chosen of pair 0
    # rejected of pair 0: after the prompt
    assert by_sequence[3] == ([1], [1], [6])
    assert by_sequence[5] == ([0, 0], [2, 5], [16, 17])              # rejected of pair 2
    assert batch["response_tokens"].tolist() == [3, 1, 2, 1, 2, 2]  # [chosen..., rejected...]
    assert batch["sequence_tokens"].tolist() == [5, 2, 5, 3, 3, 5]
    mask = packing.attention_inputs(batch)["attention_mask"][0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0],
                             # rejected never sees chosen
                             [1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]]
    # no empty row (padding sees itself)
    assert packing.attention_inputs(batch)["attention_mask"].any(-1).all()
    # one row, no padding
    layout = packing.Layout(True, 2048)
    assert packing.build_batch(examples, 0, layout)["input_ids"].shape == (1, 17)


def test_pairs_sharing_a_row_never_see_each_other(tokenizer):
    """Three pairs packed into one row: every token sees only its own pair (its prompt and its own
    side), never a token of the pairs before it; and each pair's log-probs are as in a row alone."""
    examples = [dict(prompt=[11, 12], chosen=[13], rejected=[14]),
                dict(prompt=[15], chosen=[16, 17], rejected=[18]),
                dict(prompt=[19], chosen=[20], rejected=[21])]
    batch = packing.build_batch(examples, 0, packing.Layout(True, 64))
    assert batch["input_ids"].tolist() == [list(range(11, 22))]  # one row: pairs 0, 1, 2 in order
    mask = packing.attention_inputs(batch)["attention_mask"]
    assert mask[0, 0].int().tolist() == [
        # 11 12 13 14 15 16 17 18 19 20 21      pair 0: prompt 11 12, chosen 13, rejected 14
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # pair 1: prompt 15, chosen 16 17, rejected 18
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # pair 2: prompt 19, chosen 20, rejected 21
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]]
    # eager attention's form
    additive = packing.attention_inputs(batch, torch.float32)["attention_mask"]
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    with torch.no_grad():
        packed = modeling.policy_logps(model, batch).view(2, 3)  # [chosen..., rejected...]
        alone = [modeling.policy_logps(model, packing.build_batch([e], 0, packing.Layout(True, 64)))
                 for e in examples]
    torch.testing.assert_close(packed, torch.stack(alone, 1), atol=1e-6, rtol=0)


def test_many_rows_and_empty_prompt_equal_padded(examples, tokenizer):
    """Rows of at most 1.5 × 12 tokens (several rows, padded at their ends), and a pair with no
    prompt."""
    model = tiny_model(vocab_size=len(tokenizer))
    examples = examples + [dict(prompt=[], chosen=[5, 6, 7], rejected=np.array([8, 9]))]
    args = train_args(max_length=12, micro_batch_size=7)
    layout = packing.Layout(True, args.max_length)
    assert packing.build_batch(examples, 0, layout)["input_ids"].shape[0] > 2
    assert_same_as_padded(model, examples, args, tokenizer.pad_token_id)


def test_qlora_and_gradient_checkpointing(examples, tokenizer, tmp_path):
    """4-bit base weights (nf4 on the CPU) and activation checkpointing, through prepare_model as
    train.py uses it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(tmp_path)
    run = argparse.Namespace(model=str(tmp_path), load_in_4bit=True, full=False,
                             gradient_checkpointing=True, **LORA)
    model = randomise_lora_b(modeling.prepare_model(run, "cpu", torch.float32))
    assert (model.is_activation_checkpointing
            and type(model.base_model.model.lm_head).__name__ == "Linear")
    assert_same_as_padded(model, examples, train_args(), tokenizer.pad_token_id)


def test_fallback_to_padded(examples, tokenizer):
    """Gemma-2 soft-caps attention logits and a short sliding window is bypassed by a 4-D mask: both
    run padded, and would be wrong in the packed layout (which is why the fallback exists)."""
    from transformers import Gemma2Config, MistralConfig
    args = train_args()
    gemma = tiny_model(Gemma2Config, len(tokenizer), attn_logit_softcapping=1.0,
                       final_logit_softcapping=5.0, sliding_window=4096,
                       attn_implementation="eager")
    mistral = tiny_model(MistralConfig, len(tokenizer), sliding_window=6)
    for model, reason in ((gemma, "soft-caps"), (mistral, "sliding window (6)")):
        assert reason in packing.packing_problem(modeling.text_config(model), args.max_length)
        assert modeling.choose_layout(model, args.max_length)[1].startswith("batches: padded")
        assert_same_as_padded(model, examples, args, tokenizer.pad_token_id)
    with torch.no_grad():  # the packed layout itself, forced: the window is lost
        padded, packed = (modeling.policy_logps(mistral, packing.build_batch(
            examples, 0, packing.Layout(packed, 2048))) for packed in (False, True))
    assert (padded - packed).abs().max() > 1e-3
    # packed rows of up to 4,095 tokens fit the model's 4,096 positions
    llama = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=4096)
    assert modeling.choose_layout(llama, 2048)[1].startswith("batches: packed")


def test_pair_logps_uses_packed_layout(examples, tokenizer):
    """eval's scoring (no gradients) equals the padded layout's, numpy ids included."""
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    chosen, rejected = modeling.pair_logps(model, examples, tokenizer.pad_token_id, 4,
                                           packing.Layout(True, 64))
    lists = [{k: [int(t) for t in v] for k, v in e.items()} for e in examples]
    with torch.no_grad():
        reference = [modeling.policy_logps(model, packing.padded_rows(lists[i:i + 4],
                                                                      tokenizer.pad_token_id))
                     for i in range(0, len(lists), 4)]
    reference = torch.cat([logps.view(2, -1) for logps in reference], 1)
    torch.testing.assert_close(torch.stack([chosen, rejected]), reference, atol=1e-5, rtol=0)


def test_train_says_which_layout(model_dir, tmp_path, capsys):
    rng = random.Random(0)
    rows = demo.make_pairs([rng.sample(demo.WORDS, rng.randint(1, 5)) for _ in range(4)], rng)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert train.main(["--model", str(model_dir), "--dataset", str(tmp_path / "pairs.jsonl"),
                       "--max-steps", "1", "--batch-size", "4",
                       "--output-dir", str(tmp_path / "run")]) == 0
    assert "batches: packed, each prompt computed once for chosen and rejected, no padding" in \
        capsys.readouterr().out
