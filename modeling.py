"""The model side of train.py and eval.py: load the tokenizer and the model (maybe in 4-bit), add
LoRA, score responses from the final hidden states, and check at start-up that this scoring agrees
with the model's own logits.
"""
import logging
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import packing
import parallel
import simpo
from cli import UsageError

# bitsandbytes on a CPU announces at import that an optional kernel package is missing: noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers 5: nothing to change
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def refused_remote_code(flag, name, error):
    """The one-line error of a failed load; a model that ships code runs only when trusted."""
    if "trust_remote_code" not in str(error):
        return UsageError(f"{flag} {name}: {str(error).strip().splitlines()[0]}")
    return UsageError(f"{flag} {name} ships its own Python code, which runs only with "
                      f"--trust-remote-code (pass it only for a model whose source you trust)")


def read_chat_template(value):
    """--chat-template: a Jinja template, given as its text or as a file."""
    if value and "{{" not in value and "{%" not in value:
        if not Path(value).is_file():
            raise UsageError(f"{value}: neither a file nor a Jinja template")
        value = Path(value).read_text()
    return value


def load_tokenizer(name, chat_template=None, trust_remote_code=False):
    from transformers import AutoTokenizer
    if error := cli.missing_folder("--model", name):
        raise error
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise refused_remote_code("--model", name, error) from None
    tokenizer.chat_template = read_chat_template(chat_template) or tokenizer.chat_template
    # padding is masked out of the loss: any id will do
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization(load_in_4bit, dtype):
    """QLoRA's 4-bit weights: nf4, double quantisation, `dtype` compute."""
    from transformers import BitsAndBytesConfig
    if not load_in_4bit:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_model(name, load_in_4bit=False, dtype=torch.float32, device="cpu",
               trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, quantization_config=quantization(load_in_4bit, dtype),
            device_map={"": device}, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise refused_remote_code("--model", name, error) from None
    # Cohere and Granite scale lm_head's output; simpo does not (choose_layout would refuse it too)
    for key in ("logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise UsageError(f"--model {name} scales its logits by config.{key}, which simpo does "
                             f"not apply")
    # bitsandbytes repacks 4-bit weights for CPU inference in eval mode and never back, after which
    # backward is wrong (the tests' QLoRA path)
    if load_in_4bit and device == "cpu":
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def text_config(model):
    """The decoder's config: multimodal wrappers (Gemma-3 4B+, Gemma-4) keep it in text_config."""
    return model.config.get_text_config(decoder=True)


def decoder_of(model):
    """The module that turns input ids into final hidden states (no lm_head)."""
    decoder = model.get_decoder()
    # Llama-4's text model answers get_decoder() with itself
    return decoder.model if decoder.get_output_embeddings() is not None else decoder


def language_model_linears(model):
    """"all-linear", or on a multimodal wrapper a regex over the language model's linear layers:
    the vision tower's get no gradient from text, and DDP stops at such parameters."""
    decoder = decoder_of(model)
    head = model.get_output_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    outside = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and module is not head and not name.startswith(prefix + ".")]
    if not outside:
        return "all-linear"
    names = sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
                    if isinstance(module, torch.nn.Linear)})
    return rf"{re.escape(prefix)}\.(.*\.)?({'|'.join(names)})"


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    target = args.lora_target
    if target == "all-linear":
        target = language_model_linears(model)
    else:
        target = target.split(",")
        known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [name for name in target if name not in known]
        if unknown:
            raise UsageError(f"--lora-target {args.lora_target}: this model has no module named "
                             f"{', '.join(unknown)} (e.g. q_proj, k_proj, v_proj, o_proj)")
    # log-probs use lm_head's base weight (simpo.chunked_token_logps)
    if "lm_head" in target:
        raise UsageError("--lora-target: lm_head cannot take LoRA here; train it with --full")
    # No peft.prepare_model_for_kbit_training: it upcasts embeddings, lm_head and norms to float32
    # (2+ GB more on Llama-3-8B, and a slow float32 lm_head).
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0]
        raise UsageError(f"--lora-target {args.lora_target}: {reason}") from None


def prepare_model(args, device, dtype):
    """The model as train.py trains it; --full in float32, as bf16 AdamW updates underflow."""
    model = load_model(args.model, args.load_in_4bit, torch.float32 if args.full else dtype, device,
                       getattr(args, "trust_remote_code", False))
    model = model if args.full else add_lora(model, args)
    if args.gradient_checkpointing:
        # non-reentrant, as torch recommends; newer transformers renamed the method
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    # gradient checkpointing only acts in train mode
    return model.train()


def final_hidden(model, batch):
    """Final hidden states (rows, T, H) of a batch of either layout, and lm_head's arguments of
    simpo.project_logits."""
    eager_dtype = None
    if text_config(model)._attn_implementation == "eager":
        device = batch["input_ids"].device.type
        eager_dtype = model.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(device):
            eager_dtype = torch.get_autocast_dtype(device)
    inputs = packing.attention_inputs(batch, eager_dtype)
    output = decoder_of(model)(input_ids=batch["input_ids"], use_cache=False, **inputs)
    head = model.get_output_embeddings()
    softcap = getattr(text_config(model), "final_logit_softcapping", None)
    return output.last_hidden_state, dict(lm_head_weight=head.weight, lm_head_bias=head.bias,
                                          logit_softcap=softcap)


def policy_logps(model, batch, average=True, chunk_size=1024):
    """Response log-probs (2B,) [chosen..., rejected...] of a batch of either layout."""
    hidden, head = final_hidden(model, batch)
    if "labels" in batch:
        return simpo.chunked_sequence_logps(hidden, labels=batch["labels"], average=average,
                                            chunk_size=chunk_size, **head)
    token_logps = simpo.chunked_token_logps(hidden.flatten(0, 1)[batch["score_index"]],
                                            targets=batch["targets"], chunk_size=chunk_size, **head)
    # summed per sequence, not per row
    logps = torch.zeros(len(batch["response_tokens"]), dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, batch["sequence"], token_logps)
    return logps / batch["response_tokens"].clamp(min=1) if average else logps


@torch.no_grad()
def pair_logps(model, examples, pad_id, batch_size, layout, average=True, desc="scoring"):
    """(chosen, rejected) log-probs of every pair: two (N,) float32 tensors on the CPU."""
    device = next(model.parameters()).device
    logps = []
    # under torchrun, one progress bar
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False,
                  disable=parallel.rank() > 0):
        batch = packing.build_batch(examples[i:i + batch_size], pad_id, layout)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logps.append(policy_logps(model, batch, average).float().cpu().view(2, -1))
    return tuple(torch.cat(logps, dim=1)) if logps else (torch.zeros(0), torch.zeros(0))


def reward_metrics(chosen_logps, rejected_logps, beta, gamma):
    """Held-out loss, reward accuracy, mean margin and the fraction of pairs beyond the margin γ."""
    losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(chosen_logps, rejected_logps, beta,
                                                                gamma)
    metrics = simpo.preference_metrics(chosen_logps, rejected_logps, chosen_rewards,
                                       rejected_rewards)
    metrics["loss"] = losses.mean().item()
    beyond = (chosen_rewards - rejected_rewards > gamma).float().mean()
    return metrics | {"rewards/beyond_gamma": beyond.item()}


# ---------------------------------------------------------------- the start-up check

def probe_pairs(vocab_size, max_length):
    """Seeded random pairs (prompt, chosen, rejected lengths) as real rows exercise the model: a
    one-token prompt, a short pair, and the longest packed row a run can build
    (packing.longest_row), whose rejected tokens read the prompt across a chosen response that
    crosses any window shorter than max_length, max_length − 1 places in the row after their
    positions."""
    shapes = [(1, 8, 6), (5, 9, 12), (1, max_length - 1, max_length - 1)]
    generator = torch.Generator().manual_seed(0)
    return [{name: torch.randint(vocab_size, (n,), generator=generator).tolist()
             for name, n in zip(("prompt", "chosen", "rejected"), shape, strict=True)}
            for shape in shapes if min(shape) > 0]


def own_logps(model, pairs):
    """Average response log-probs (2B,) from the model's own `logits`, one sequence at a time:
    whatever the model does after its last layer is in them."""
    device = next(model.parameters()).device
    logps = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            ids = torch.tensor([pair["prompt"] + pair[side]], device=device)
            start = len(pair["prompt"])
            logits = model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].float()
            logps.append(logits.log_softmax(-1).gather(1, ids[0, start:, None]).mean())
    return torch.stack(logps)


@torch.no_grad()
def choose_layout(model, max_length):
    """(packing.Layout, the line a run prints) for sequences (prompt + the longer response) of at
    most `max_length` tokens, the longest the run scores: probe pairs as long as real ones scored
    packed, padded and by the model's own logits. Packed if the config allows it and it agrees;
    padded if not; refused if even padded disagrees, or if the sequences pass the model's
    positions. Tolerance per token of average log-prob: 1e-4 in float32 (the layouts agree to
    ~1e-5); 0.2 in 16-bit, where SmolLM2-135M's agree to 0.05 (4-bit: 0.03) and a rejected
    response that reads its chosen one moves them by 0.6 to 1.8."""
    started = time.time()
    training = model.training
    config = text_config(model)
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings().weight
    tolerance = 0.2 if device.type == "cuda" or embeddings.dtype != torch.float32 else 1e-4
    positions = getattr(config, "max_position_embeddings", None)
    if positions and max_length > positions:
        raise UsageError(f"pairs of up to {max_length} tokens pass {config.model_type}'s "
                         f"{positions} positions (config.max_position_embeddings): pass "
                         f"--max-length {positions}")
    pairs = probe_pairs(embeddings.shape[0], max_length)
    # the short pairs share a row; the longest one alone, not padding the others to its length
    groups = [group for group in (pairs[:2], pairs[2:]) if group]

    def distance(packed):
        distances = []
        for group, reference in zip(groups, own, strict=True):
            batch = packing.build_batch(group, 0, packing.Layout(packed, max_length))
            batch = {k: v.to(device) for k, v in batch.items()}
            distances.append((policy_logps(model, batch) - reference).abs().max())
        # (torch's max keeps a NaN)
        return torch.stack(distances).max().item()

    # eval: no dropout
    model.eval()
    try:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            try:
                own = [own_logps(model, group) for group in groups]
                padded = distance(False)
            except Exception as error:
                # e.g. a module that LoRA cannot wrap (Llama-4's MoE router)
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                raise UsageError(f"{config.model_type}: scoring fails on this model with LoRA "
                                 f"({type(error).__name__}: {reason}); try --lora-target") from None
            # "not <=": NaN fails too
            if not padded <= tolerance:
                raise UsageError(f"{config.model_type}: simpo's log-probs differ from the model's "
                                 f"own logits by {padded:.3g} per token (tolerance {tolerance:g}): "
                                 f"the model does something after its last layer that simpo does "
                                 f"not apply; refusing it")
            problem = packing.packing_problem(config, max_length)
            if problem is None:
                try:
                    packed = distance(True)
                except Exception as error:
                    # e.g. ALiBi models (Bloom) build their bias from a 2-D mask
                    problem = f"packed layout fails on {config.model_type}: {type(error).__name__}"
                else:
                    if not packed <= tolerance:
                        problem = f"packed layout changes this model's numbers by {packed:.2g}"
    finally:
        model.train(training)
    checked = f"checked against the model's own logits in {time.time() - started:.1f} s"
    if problem:
        return (packing.Layout(False, max_length),
                f"batches: padded, each prompt computed twice ({problem}); {checked}")
    return packing.Layout(True, max_length), (f"batches: packed, each prompt computed once for "
                                              f"chosen and rejected, no padding; {checked}")
