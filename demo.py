"""The offline demo's scaffolding: a toy preference task and a tiny Llama model built locally.

    python demo.py     # writes data/demo/ and data/demo-chat/ {train,test}.jsonl (deterministic)
    python train.py    # train on them, then: python eval.py --adapter runs/demo

A prompt asks to "shout:" or "whisper:" a few words; the chosen response repeats them in that case,
the rejected one in the other; half the prompts want each, so a model has to read the instruction.
Held-out prompts use unseen word combinations. data/demo-chat/ holds the same pairs as chats.
"""
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger maple candle orbit pepper silver harbor violet lantern "
         "meadow falcon copper ember glacier willow thunder velvet canyon puzzle rocket").split()
INSTRUCTIONS = ("shout:", "whisper:")
DATA_DIR = Path(__file__).parent / "data" / "demo"

# Settings the demo runs with, unless a flag on the command line says otherwise (see train.py).
TRAINING = dict(dataset=str(DATA_DIR), split="train", eval_split="test", output_dir="runs/demo",
                lr=2e-3, beta=2.0, batch_size=16, micro_batch_size=16, epochs=4, max_length=64,
                max_prompt_length=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                load_in_4bit=False, gradient_checkpointing=False)

# Special tokens no ordinary word starts with: one that prefixes normal text breaks tokenization.
SPECIAL = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|bos|>", "eos": "<|end|>"}
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# every turn ends with the EOS token, as Llama-3's does
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def make_pairs(word_lists, rng):
    pairs = []
    for text in map(" ".join, word_lists):
        instruction = rng.choice(INSTRUCTIONS)
        loud, quiet = text.upper(), text.lower()
        chosen, rejected = (loud, quiet) if instruction == "shout:" else (quiet, loud)
        pairs.append({"prompt": f"{instruction} {text}", "chosen": chosen, "rejected": rejected})
    return pairs


def write_data(folder=DATA_DIR, n_train=512, n_test=128, seed=0):
    """Write train.jsonl and test.jsonl; test word sequences never occur in train."""
    rng = random.Random(seed)
    word_lists = {}  # an ordered set
    while len(word_lists) < n_train + n_test:
        word_lists[tuple(rng.sample(WORDS, rng.randint(2, 5)))] = None
    all_pairs = make_pairs(word_lists, rng)
    folder, chat_folder = Path(folder), Path(folder).with_name(Path(folder).name + "-chat")
    for name, pairs in (("train", all_pairs[:n_train]), ("test", all_pairs[n_train:])):
        chat = [p | {side: [{"role": "user", "content": p["prompt"]},
                            {"role": "assistant", "content": p[side]}]
                     for side in ("chosen", "rejected")} for p in pairs]
        for where, rows in ((folder, pairs), (chat_folder, chat)):
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def build_tiny_model(folder, words=WORDS, hidden_size=64, num_layers=2, seed=0):
    """Save a random Llama model and a word-level tokenizer with a chat template to `folder`, an
    ordinary model folder (from_pretrained, 4-bit, LoRA). Each word is a token in both cases."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    cased_words = dict.fromkeys([w.lower() for w in words] + [w.upper() for w in words])
    vocab = {t: i for i, t in enumerate([*SPECIAL.values(), *ROLES, *INSTRUCTIONS, *cased_words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Plain-text tokenization (no chat template) starts with BOS, as Llama's tokenizer does.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=list(ROLES),
        chat_template=CHAT_TEMPLATE, **{f"{role}_token": token for role, token in SPECIAL.items()})
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    import argparse
    # --help describes and writes nothing
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(f"wrote {write_data()} and its -chat twin")
