"""Peak memory and speed of one SimPO training step as train.py takes it (QLoRA, chunked log-probs), and, with
--trl, the same step taken by TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0) in the same run.

    python bench/step.py --shape llama3-8b --seq-len 2048 --trl    # on a GPU (--trl needs `pip install trl`)
    python bench/step.py --shape tiny --seq-len 64                  # on a CPU: checks the script itself

Builds a model of the given shape with random weights and saves it; each contender loads it back in 4-bit
(nf4, on CUDA) with LoRA r=16 on every linear layer and gradient checkpointing, then takes `--steps` optimizer
steps of one preference pair (chosen and rejected `--seq-len` tokens each, half of them response) after a
warm-up step. Peak memory counts from the model's load. Prints and writes JSON; asserts nothing.
"""
import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import modeling  # noqa: E402
import train  # noqa: E402

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target="all-linear")


def simpo_step_times(folder, pair, args, device, dtype):
    settings = dict(model=folder, full=False, micro_batch_size=1, beta=2.5, gamma=1.4, sft_weight=0.0,
                    max_length=args.seq_len,
                    no_length_normalization=False, **LORA)
    run = argparse.Namespace(**{**vars(args), **settings})
    model = modeling.prepare_model(run, device, dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        train.accumulate_gradients(model, [pair], run, pad_id=0)  # exactly train.py's forward and backward
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def trl_step_times(folder, pair, args, device, dtype):
    """TRL tokenizes text: a word-level tokenizer whose words are the token ids ("t17") gives it the same
    tokens."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    vocab_size = SHAPES[args.shape]["vocab_size"]
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1",
                                        eos_token="t2", unk_token="t3")
    text = {k: " ".join(f"t{i}" for i in ids) for k, ids in pair.items()}
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    model = modeling.load_model(folder, args.load_in_4bit, dtype, device)
    config = CPOConfig(output_dir=str(Path(folder) / "trl-output"), loss_type="simpo", cpo_alpha=0.0,
                       beta=2.5, simpo_gamma=1.4, learning_rate=1e-5, max_steps=args.steps + 1,
                       per_device_train_batch_size=1, gradient_accumulation_steps=1,
                       max_length=2 * args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                       bf16=device == "cuda", use_cpu=device == "cpu",
                       logging_steps=1, report_to=[], save_strategy="no", disable_dropout=False)
    lora = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list([text] * (args.steps + 1)),
               processing_class=tokenizer, peft_config=lora, callbacks=[Timer()]).train()
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trl", action="store_true", help="also time TRL's CPOTrainer on the same model and pair")
    p.add_argument("--no-load-in-4bit", dest="load_in_4bit", action="store_false")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--out", default="runs/bench/step.json")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    args.load_in_4bit = args.load_in_4bit and cuda
    scratch = tempfile.TemporaryDirectory(prefix="simpo-bench-")  # deleted when main() returns: 16 GB for 8B
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(8192, args.seq_len),
                         tie_word_embeddings=False)
    with torch.device(device):  # random init on the GPU: minutes faster for 8B
        LlamaForCausalLM(config).to(dtype).save_pretrained(scratch.name)
    half = args.seq_len // 2
    # ids from 4 up: not a special token
    prompt, chosen, rejected = torch.randint(4, config.vocab_size, (3, half)).tolist()
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}  # 2 sequences of seq_len tokens
    results = []
    for name, step_times in [("simpo", simpo_step_times)] + [("trl", trl_step_times)] * args.trl:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = step_times(scratch.name, pair, args, device, dtype)
        step_time = statistics.median(times[1:])  # the first step warms up kernels and allocator
        results.append({"setup": name, "shape": args.shape, "seq_len": args.seq_len,
                        "load_in_4bit": args.load_in_4bit,
                        "gradient_checkpointing": args.gradient_checkpointing,
                        "device": torch.cuda.get_device_name() if cuda else "cpu",
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                        "step_s": step_time, "tokens_per_s": 4 * half / step_time})
        print(json.dumps(results[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
