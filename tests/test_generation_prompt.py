"""The prompt ids around a response, on tokenizers built here (always run) and on the real Mistral
tokenizer (../shared/fixtures, skipped when absent): the prompt a model samples after, the ids a
response's first token takes from the prompt (read, not scored), and a truncated prompt's head.

The built tokenizers split text into characters, and two BPE merges join "]" with a following "["
or "*": as on Mistral, where a reply follows "[/INST]" directly, a response's first token can
swallow the prompt's last character. A third merge, ranked after them, joins "T]": the prompt
rendered alone then ends in "T]", a conversation in "T" and "][", so the prompt's last id is not
the generation prompt's."""
import contextlib
import json
from pathlib import Path

import pytest

import generation
import preferences

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("]", "["), ("]", "*")]
T_MERGE = [*MERGES, ("T", "]")]
# Mistral's layout: "<s>[INST] question [/INST]answer</s>"; nothing follows "[/INST]" but the reply
MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
# ChatML with a default system turn, as SmolLM2's: turns end at <|im_end|>
CHATML = ("{% if messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
          "{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_HEAD = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def char_tokenizer(template, merges=MERGES, **special_tokens):
    """A fast tokenizer of single characters (printable ASCII and newline) and `merges`, with
    SPECIALS, `template`, and the special tokens given ("bos_token", "eos_token")."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    symbols = [*SPECIALS, "\n", *map(chr, range(32, 127)), *("".join(m) for m in merges)]
    # no pre-tokenizer: a merge may join characters across the prompt/response boundary
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[4:], **special_tokens)


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def user(text):
    return [{"role": "user", "content": text}]


def alone(tokenizer, prompt):
    """The prompt rendered alone with the generation prompt, tokenized as the template wrote it."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load(tokenizer, rows, tmp_path, max_length=4096, max_prompt_length=4000):
    path = tmp_path / f"pairs-{max_length}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples, _, summary = preferences.load_examples(tokenizer, str(path), "train",
                                                     max_length=max_length,
                                                     max_prompt_length=max_prompt_length)
    return examples, summary


# both responses' first tokens swallow the prompt's last "]"; one of them does; none does
ROWS = [{"prompt": "Add 1 to [2, 3].", "chosen": "[3, 4]", "rejected": "*Sure*"},
        {"prompt": "Add 1 to [2].", "chosen": "[3]", "rejected": "Sure: 3"},
        {"prompt": "Say yes.", "chosen": "Yes", "rejected": "No"}]


@pytest.mark.parametrize("merges, unscored, prompt_end", [
    (MERGES, [[0, 0], [0, 1], [0, 0]], [[0, "]"], [0, "]"], [0]]),
    (T_MERGE, [[0, 0], [1, 1], [0, 0]], [[1, "T]"], [0, "T]"], [0]])], ids=["2-merges", "T]"])
def test_the_generation_prompt_is_the_prompt_rendered_alone(merges, unscored, prompt_end,
                                                            tmp_path):
    tokenizer = char_tokenizer(MISTRAL_LIKE, merges, bos_token="<s>", eos_token="</s>")
    examples, _ = load(tokenizer, ROWS, tmp_path)
    assert [example["unscored"] for example in examples] == unscored
    assert [[n, *tokenizer.convert_ids_to_tokens(ids)] for n, *ids in
            (example["prompt_end"] for example in examples)] == prompt_end
    for example, row in zip(examples, ROWS, strict=True):
        expected = alone(tokenizer, user(row["prompt"]))
        assert tokenizer.decode(expected).endswith(" [/INST]")
        assert preferences.generation_prompt(example) == expected


def test_a_truncated_generation_prompt_loses_what_the_prompt_loses(tmp_path):
    """The same ids cut from the start of the text; the head and the rendered-alone end stay."""
    tokenizer = char_tokenizer(MISTRAL_LIKE, T_MERGE, bos_token="<s>", eos_token="</s>")
    rows = [{**ROWS[0], "prompt": "Read this: " + "abc " * 30 + ROWS[0]["prompt"]}]
    [whole], _ = load(tokenizer, rows, tmp_path)
    assert whole["prompt_end"][0] == 1  # "T]" replaces the prompt's last id
    [cut], summary = load(tokenizer, rows, tmp_path, max_length=64, max_prompt_length=48)
    assert len(cut["prompt"]) == 48 and summary.counts["train"]["truncated"] == 1
    keep = len(preferences.prompt_head(tokenizer))
    removed = len(whole["prompt"]) - 48
    expected = preferences.generation_prompt(whole)
    assert preferences.generation_prompt(cut) == expected[:keep] + expected[keep + removed:]
    assert tokenizer.decode(preferences.generation_prompt(cut)).endswith("[2, 3]. [/INST]")


def test_a_response_token_that_holds_prompt_text_is_read_not_scored():
    """`unscored` counts the ids at a response's start that hold prompt text: "[3]" swallows the
    prompt's "]" into "][" (it holds the response's "[": scored); "Sure: 3" leaves a bare "]"
    before its text: read, not scored, so that the prompt both sides share ends where both
    agree."""
    tokenizer = char_tokenizer(MISTRAL_LIKE, bos_token="<s>", eos_token="</s>")
    pair = preferences.to_pair(ROWS[1], "row 2")
    end = preferences.end_of_turn(tokenizer)
    [(prompt, chosen, rejected, unscored)] = preferences._token_ids(tokenizer, [pair], end)
    assert unscored == [0, 1]
    assert tokenizer.convert_ids_to_tokens(chosen) == ["][", "3", "]", "</s>"]
    assert tokenizer.convert_ids_to_tokens(rejected)[:2] == ["]", "S"]
    assert tokenizer.decode(prompt).endswith(" [/INST")
    for reply, ids in (("[3]", chosen), ("Sure: 3", rejected)):
        conversation = user(ROWS[1]["prompt"]) + [{"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert prompt + ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_truncated_prompt_keeps_the_template_head_in_at_most_half_the_room(tmp_path):
    """BOS-less ChatML with a default system turn: the head is the system turn and the user's role
    header (25 ids), the end the question and the assistant's header."""
    tokenizer = char_tokenizer(CHATML, eos_token="<|endoftext|>")
    head = preferences.prompt_head(tokenizer)
    assert tokenizer.decode(head) == CHATML_HEAD and len(head) == 25
    prompt = "Read this: " + "abc " * 30 + "Which word?"
    [example], summary = load(tokenizer, [{"prompt": prompt, "chosen": "abc", "rejected": "no"}],
                              tmp_path, max_length=64, max_prompt_length=56)
    whole = alone(tokenizer, user(prompt))
    assert len(whole) > 150 and summary.counts["train"]["truncated"] == 1
    assert example["prompt"] == whole[:25] + whole[25 - 56:]
    assert tokenizer.decode(example["prompt"]).endswith(
        "abc Which word?<|im_end|>\n<|im_start|>assistant\n")
    # with 16 ids of room, the head keeps 8: the end still holds the assistant's header
    short, responses = preferences._truncate(whole, [[7, 8]], head, 20, 16)
    assert short == whole[:8] + whole[8 - 16:] and responses == [[7, 8]]


def test_samples_are_drawn_after_the_generation_prompt(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = char_tokenizer(MISTRAL_LIKE, bos_token="<s>", eos_token="</s>")
    examples, _ = load(tokenizer, ROWS, tmp_path)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    samples = generation.generate_samples(model, lambda: contextlib.nullcontext(model), tokenizer,
                                          examples, 3, 2, sides=("base",))
    for sample in samples:
        prompt = alone(tokenizer, user(ROWS[sample["row"]]["prompt"]))
        assert sample["prompt"] == tokenizer.decode(prompt)


@pytest.mark.skipif(not (FIXTURES / "real-tokenizers").is_dir(), reason="../shared/fixtures absent")
def test_mistral_generation_prompt_keeps_the_end_of_inst_when_both_replies_swallow_it(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "real-tokenizers" / "mistral-instruct")
    rows = [{"prompt": "Add 1 to each of [2, 3].", "chosen": "[3, 4]", "rejected": "*Sure*"}]
    [example], _ = load(tokenizer, rows, tmp_path)
    assert example["unscored"] == [0, 0]
    expected = alone(tokenizer, user(rows[0]["prompt"]))
    assert tokenizer.decode(expected).endswith("[/INST]")
    assert preferences.generation_prompt(example) == expected
