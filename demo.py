"""The offline demo's scaffolding: a toy preference task and a tiny Llama model built locally.

    python demo.py     # writes data/demo/ and data/demo-chat/ {train,test}.jsonl (deterministic)
    python train.py    # train on them, then: python eval.py --adapter runs/demo

The task: a prompt asks to "shout:" or "whisper:" a few words; the chosen response repeats them in
the asked-for case, the rejected one in the other case. Half the prompts want each case, so a model
that merely prefers one case is at chance: it has to read the instruction. Held-out prompts use word
combinations never seen in training. data/demo-chat/ holds the same pairs in the conversational
layout of HuggingFaceH4/ultrafeedback_binarized (a `prompt` string, `chosen`/`rejected` as whole
conversations).
"""
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger maple candle orbit pepper silver harbor violet "
         "lantern meadow falcon copper ember glacier willow thunder velvet canyon puzzle "
         "rocket").split()
INSTRUCTIONS = ("shout:", "whisper:")
DATA_DIR = Path(__file__).parent / "data" / "demo"

# Settings the demo runs with, unless a flag on the command line says otherwise (see train.py).
TRAINING = dict(dataset=str(DATA_DIR), split="train", eval_split="test", output_dir="runs/demo",
                lr=2e-3, beta=2.0, batch_size=16, micro_batch_size=16, epochs=4,
                max_length=64, max_prompt_length=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                load_in_4bit=False, gradient_checkpointing=False)

# Special tokens in a form no ordinary word starts with: a special token that prefixes normal text
# breaks tokenization.
SPECIAL = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|bos|>", "eos": "<|end|>"}
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# every turn ends with the EOS token, as Llama-3's does
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def make_pairs(word_lists, rng):
    pairs = []
    for words in word_lists:
        instruction = rng.choice(INSTRUCTIONS)
        text = " ".join(words)
        loud, quiet = text.upper(), text.lower()
        chosen, rejected = (loud, quiet) if instruction == "shout:" else (quiet, loud)
        pairs.append({"prompt": f"{instruction} {text}", "chosen": chosen, "rejected": rejected})
    return pairs


def write_data(folder=DATA_DIR, n_train=512, n_test=128, seed=0):
    """Write train.jsonl and test.jsonl; test word sequences never occur in train."""
    rng = random.Random(seed)
    seen, word_lists = set(), []
    while len(word_lists) < n_train + n_test:
        words = tuple(rng.sample(WORDS, rng.randint(2, 5)))
        if words not in seen:
            seen.add(words)
            word_lists.append(words)
    folder, chat_folder = Path(folder), Path(folder).with_name(Path(folder).name + "-chat")
    for name, lists in (("train", word_lists[:n_train]), ("test", word_lists[n_train:])):
        pairs = make_pairs(lists, rng)
        chat = [{"prompt": p["prompt"], **{side: [{"role": "user", "content": p["prompt"]},
                                                  {"role": "assistant", "content": p[side]}]
                                           for side in ("chosen", "rejected")}}
                for p in pairs]
        for where, rows in ((folder, pairs), (chat_folder, chat)):
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def build_tiny_model(folder, words=WORDS, hidden_size=64, num_layers=2, seed=0):
    """Save a randomly initialised Llama model and a word-level tokenizer with a chat template to
    `folder`, as an ordinary model folder, so that `from_pretrained`, 4-bit loading and LoRA run
    exactly as for a hub model. Words are case-sensitive tokens; every word is in the vocabulary in
    lower and upper case."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cased_words = dict.fromkeys([w.lower() for w in words] + [w.upper() for w in words])
    tokens = [*SPECIAL.values(), *ROLES, *INSTRUCTIONS, *cased_words]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Plain-text tokenization (no chat template) starts with BOS, as Llama's tokenizer does.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL["bos"],
                                        eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                        unk_token=SPECIAL["unk"],
                                        additional_special_tokens=list(ROLES))
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=vocab[SPECIAL["bos"]], eos_token_id=vocab[SPECIAL["eos"]],
                         pad_token_id=vocab[SPECIAL["pad"]])
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    print(f"wrote {write_data()} and its -chat twin")
