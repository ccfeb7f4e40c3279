"""Model plumbing that train.py and eval.py share: load the tokenizer and the model (maybe in 4-bit), add
LoRA, and score responses from the final hidden states. Plus the one-line errors and checks both command
lines use.
"""
import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

import data
import simpo

# On CPUs, bitsandbytes announces at import that an optional kernel package from the hub is missing: noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class UsageError(ValueError):
    """A bad combination of flags or an output folder in the way: one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with defaults, except None and False (off, or decided at run time)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def require_positive(args, *flags):
    """Whole-number flags that must be at least 1, and the two token limits, which must also nest."""
    for flag in flags + ("max_length", "max_prompt_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_prompt_length > args.max_length:
        raise UsageError(f"--max-prompt-length {args.max_prompt_length} exceeds "
                         f"--max-length {args.max_length}")


def check_beta_gamma(beta, gamma):
    try:
        # the loss's own checks, before hours of work
        simpo.simpo_loss(torch.zeros(1), torch.zeros(1), beta, gamma)
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def refused_remote_code(name, error):
    """A model that ships its own Python code is loaded only with --trust-remote-code."""
    if "trust_remote_code" not in str(error):
        return error
    return UsageError(f"--model {name} ships its own Python code, which runs only with --trust-remote-code "
                      f"(pass it only for a model whose source you trust)")


def load_tokenizer(name, chat_template=None, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:  # no such folder, or a hub id that cannot be reached
        raise UsageError(f"--model {name}: {str(error).strip().splitlines()[0]}") from None
    except ValueError as error:
        raise refused_remote_code(name, error) from None
    if chat_template and "{{" not in chat_template and "{%" not in chat_template:  # not a template: a file
        if not Path(chat_template).is_file():
            raise UsageError(f"--chat-template {chat_template}: neither a file nor a Jinja template")
        chat_template = Path(chat_template).read_text()
    tokenizer.chat_template = chat_template or tokenizer.chat_template
    if tokenizer.pad_token_id is None:  # padding is masked out of the loss, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name, load_in_4bit=False, dtype=torch.float32, device="cpu", trust_remote_code=False):
    """The model as `from_pretrained` gives it: a local folder or a hub id, optionally in 4-bit (nf4).
    Code shipped with a model (`auto_map` in its config) runs only with `trust_remote_code=True`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if load_in_4bit else None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quantization,
                                                     device_map={"": device},
                                                     trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise refused_remote_code(name, error) from None
    for key in ("logit_scale", "logits_scaling"):  # Cohere, Granite: logits = lm_head(h) scaled; not handled
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise UsageError(f"--model {name} scales its logits by config.{key}, which simpo does not apply")
    if load_in_4bit and device == "cpu":  # (the tests' QLoRA path) bitsandbytes repacks 4-bit weights for CPU
        for module in model.modules():    # inference in eval mode and never back: backward is then wrong
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    target = args.lora_target
    if target != "all-linear":  # "q_proj, v_proj": every name must be a module of this model
        target = [name.strip() for name in target.split(",") if name.strip()]
        known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [name for name in target if name not in known]
        if unknown or not target:
            raise UsageError(f"--lora-target {args.lora_target}: this model has no module named "
                             f"{', '.join(unknown) or 'at all'} (e.g. q_proj, k_proj, v_proj, o_proj)")
    if "lm_head" in target:  # log-probs use lm_head's base weight (simpo.chunked_sequence_logps): no training
        raise UsageError("--lora-target: lm_head cannot take LoRA here; train it with --full")
    # No peft.prepare_model_for_kbit_training: it upcasts embeddings, lm_head and norms to float32
    # (2+ GB more on Llama-3-8B, and a slow float32 lm_head). Gradient checkpointing is turned on by hand
    # instead, so the model stays in bf16 around the 4-bit weights.
    try:
        return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                lora_dropout=args.lora_dropout, target_modules=target,
                                                task_type="CAUSAL_LM"))
    except ValueError as error:  # e.g. a --lora-target the model does not have
        raise UsageError(f"--lora-target {args.lora_target}: {str(error).strip().splitlines()[0]}") from None


def prepare_model(args, device, dtype):
    """The model as train.py trains it: loaded (maybe in 4-bit), LoRA unless --full, checkpointing, train
    mode."""
    # Full fine-tuning keeps float32 master weights (bf16 AdamW updates underflow); LoRA keeps the base in
    # bf16.
    model = load_model(args.model, args.load_in_4bit, torch.float32 if args.full else dtype, device,
                       getattr(args, "trust_remote_code", False))
    model = model if args.full else add_lora(model, args)
    if args.gradient_checkpointing:  # non-reentrant, as torch recommends; newer transformers renamed it
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    return model.train()  # gradient checkpointing only acts in train mode


def final_hidden(model, batch):
    """Final hidden states (B, T, H) and the lm_head arguments of simpo.project_logits: no logits computed."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state  # no KV cache: nothing is generated
    head = model.get_output_embeddings()
    return hidden, dict(lm_head_weight=head.weight, lm_head_bias=head.bias,
                        logit_softcap=getattr(model.config, "final_logit_softcapping", None))


def policy_logps(model, batch, average=True):
    """Per-sequence response log-probs (2B,) from one forward pass over [chosen..., rejected...]."""
    hidden, head = final_hidden(model, batch)
    return simpo.chunked_sequence_logps(hidden, labels=batch["labels"], average=average, **head)


@torch.no_grad()
def pair_logps(model, examples, pad_id, batch_size, average=True, desc="scoring"):
    """Average log-probs of every chosen and rejected response: two (N,) float32 tensors on the CPU."""
    device, chosen, rejected = next(model.parameters()).device, [], []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in data.collate(examples[i:i + batch_size], pad_id).items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            c, r = policy_logps(model, batch, average).chunk(2)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def reward_metrics(chosen_logps, rejected_logps, beta, gamma):
    """Held-out loss, reward accuracy, mean margin and the fraction of pairs beyond the margin γ."""
    losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(chosen_logps, rejected_logps, beta, gamma)
    metrics = simpo.preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
    metrics["loss"] = losses.mean().item()
    metrics["rewards/beyond_gamma"] = (chosen_rewards - rejected_rewards > gamma).float().mean().item()
    return metrics
