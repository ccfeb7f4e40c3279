"""Peak memory and speed of one SimPO training step, the way train.py takes it (QLoRA, chunked log-probs).

    python bench/step.py --shape llama3-8b --seq-len 2048     # on a GPU: random weights, no download
    python bench/step.py --shape tiny --seq-len 64            # on a CPU: checks the script itself

Builds a model of the given shape with random weights, saves it, loads it back through train.load_model
(4-bit nf4 on CUDA) and add_lora, then times `--steps` optimizer steps of one preference pair (chosen and
rejected `--seq-len` tokens each, half of them response) after a warm-up step. Prints and writes JSON.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-load-in-4bit", dest="load_in_4bit", action="store_false")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--out", default="runs/bench/step.json")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    scratch = tempfile.TemporaryDirectory(prefix="simpo-bench-")  # deleted when main() returns: 16 GB for 8B
    folder = scratch.name
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(8192, args.seq_len), tie_word_embeddings=False)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: minutes faster for 8B
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    if cuda:
        torch.cuda.empty_cache()
    settings = dict(model=folder, full=False, lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target="all-linear",
                    micro_batch_size=1, beta=2.5, gamma=1.4, sft_weight=0.0, no_length_normalization=False)
    args = argparse.Namespace(**{**vars(args), **settings, "load_in_4bit": args.load_in_4bit and cuda})
    model = train.prepare_model(args, device, dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    half = args.seq_len // 2
    prompt, chosen, rejected = torch.randint(0, config.vocab_size, (3, half)).tolist()
    pairs = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]  # 2 sequences of seq_len tokens
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 1):
        started = time.perf_counter()
        train.accumulate_gradients(model, pairs, args, pad_id=0)  # exactly train.py's forward and backward
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_time = statistics.median(times[1:])  # the first step warms up kernels and allocator
    result = {"shape": args.shape, "seq_len": args.seq_len, "load_in_4bit": args.load_in_4bit,
              "gradient_checkpointing": args.gradient_checkpointing,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "step_s": step_time, "tokens_per_s": 4 * half / step_time}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
