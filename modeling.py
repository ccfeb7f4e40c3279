"""Model plumbing that train.py and eval.py share: load the tokenizer and the model (maybe in 4-bit), add
LoRA, and score responses from the final hidden states. Plus the one-line errors and checks both command
lines use.
"""
import argparse
import logging
import math
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import data
import parallel
import simpo

# On CPUs, bitsandbytes announces at import that an optional kernel package from the hub is missing: noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21's PeftModel reads transformers' `is_gradient_checkpointing`, deprecated in transformers 5: every
# run would print the warning, and there is nothing for a user to change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


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


def read_chat_template(value):
    """--chat-template: the template's text, given as itself or as a file to read."""
    if value and "{{" not in value and "{%" not in value:  # not a template: a file
        if not Path(value).is_file():
            raise UsageError(f"--chat-template {value}: neither a file nor a Jinja template")
        value = Path(value).read_text()
    return value


def load_tokenizer(name, chat_template=None, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:  # no such folder, or a hub id that cannot be reached
        raise UsageError(f"--model {name}: {str(error).strip().splitlines()[0]}") from None
    except ValueError as error:
        raise refused_remote_code(name, error) from None
    tokenizer.chat_template = read_chat_template(chat_template) or tokenizer.chat_template
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


def decoder_of(model):
    """The module that turns input ids into final hidden states (no lm_head)."""
    decoder = model.get_decoder()
    if decoder.get_output_embeddings() is not None:  # Llama-4's text model answers with itself
        decoder = decoder.model
    return decoder


def language_model_linears(model):
    """"all-linear" for this model: on a multimodal wrapper (Gemma-3 4B+, Gemma-4), a regex over the
    language model's linear layers alone. The vision tower's would get no gradient from text, and DDP
    stops at parameters that never get one."""
    decoder, head = decoder_of(model), model.get_output_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    outside = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and module is not head and not name.startswith(prefix + ".")]
    if not outside:
        return "all-linear"
    names = sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
                    if isinstance(module, torch.nn.Linear)})
    return rf"{re.escape(prefix)}\.(.*\.)?({'|'.join(names)})"


def sampling_config(model, tokenizer, temperature, top_p, max_new_tokens):
    """A GenerationConfig that samples from the model's softmax alone (at `temperature`, within
    `top_p`), and the model's stop tokens. transformers 5 fills every field a GenerationConfig
    leaves unset from the model's generation_config.json (repetition_penalty, no_repeat_ngram_size,
    min_new_tokens, ...): once this config is the model's own (`generation_config` of every
    GenerationMixin module), the library's neutral defaults fill the rest (top_k's is 50, hence 0).
    Only the model's stop tokens are kept (Gemma-2 ends a turn with <end_of_turn>, not its EOS)."""
    from transformers import GenerationConfig
    stop = model.generation_config.eos_token_id or tokenizer.eos_token_id
    stop = sorted({tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop])})
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stop), stop


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    target = args.lora_target
    if target == "all-linear":
        target = language_model_linears(model)
    else:  # "q_proj, v_proj": every name must be a module of this model
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
    except ValueError as error:  # e.g. a --lora-target peft cannot wrap (act_fn)
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


def text_config(model):
    """The decoder's config: multimodal wrappers (Gemma-3 4B+, Gemma-3n, Gemma-4) keep it in text_config."""
    return model.config.get_text_config(decoder=True)


# Layers whose only mixing of tokens is attention under the mask: any other kind (Mamba, linear attention,
# convolution) carries a state along the whole row, across the pairs that share it.
ATTENTION_LAYERS = {"attention", "full_attention", "sliding_attention", "chunked_attention"}


def shared_layout_problem(model, max_length):
    """Why the model's config rules out the packed layout of `build_batch` (None when it does not). The
    layout needs a 4-D attention mask used as given in every layer: only attention layers, no attention
    soft-capping, and no sliding window or attention chunk that a sequence of `max_length` tokens could
    exceed (a 4-D mask bypasses the model's own window). `choose_layout` then checks the numbers."""
    config = text_config(model)
    attention = getattr(config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    window = window or getattr(config, "attention_chunk_size", None)
    other = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYERS)
    if other:
        return f"{config.model_type} has {'/'.join(other)} layers, whose state runs along the whole row"
    if attention not in ("sdpa", "eager"):  # FlashAttention and FlexAttention take no dense 4-D mask
        return f"{attention} attention takes no 4-D mask"
    if getattr(config, "attn_logit_softcapping", None):  # Gemma-2
        return f"{config.model_type} soft-caps its attention logits"
    if window and window < max_length:
        return f"{config.model_type}'s sliding window ({window}) is shorter than {max_length} tokens"
    return None


def probe_pairs(vocab_size, max_length, window):
    """A few short pairs of seeded random ids for `choose_layout`: one whose prompt is a single token, one
    with longer sides, and one longer than the model's window when it declares one."""
    shapes = [(1, 8, 6), (5, 9, 12)]
    if window and window < max_length:
        shapes.append((min(max_length, window + 8) - 8, 8, 6))
    generator = torch.Generator().manual_seed(0)
    return [{name: torch.randint(vocab_size, (n,), generator=generator).tolist()
             for name, n in zip(("prompt", "chosen", "rejected"), shape, strict=True)} for shape in shapes]


def own_logps(model, pairs):
    """Average response log-probs (2B,) [chosen..., rejected...] from the model's own `logits`, one sequence
    at a time: whatever the model does after its last layer (scaling, soft-capping) is in them."""
    device, logps = next(model.parameters()).device, []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            ids = torch.tensor([pair["prompt"] + pair[side]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(pair["prompt"]) - 1:-1]
            logps.append(logits.float().log_softmax(-1).gather(1, ids[0, len(pair["prompt"]):, None]).mean())
    return torch.stack(logps)


@torch.no_grad()
def choose_layout(model, max_length):
    """(packed, the line a run prints): the batch layout to score this model in, checked on the model itself.

    A few probe pairs are scored three ways: packed, padded, and from the model's own logits. Packed is
    used when the config allows it and its numbers equal the model's own; padded when they do not; and a
    model whose padded numbers differ too (logits rescaled by model code simpo does not know) is refused,
    since training and evaluation would be silently wrong. The tolerance is per token of average log-prob:
    1e-4 in float32, where the layouts agree to ~1e-5; 0.2 in 16-bit compute, where SmolLM2-135M's agree to
    0.05 (bf16, 4-bit: 0.03) and a rejected response that reads its chosen one moves them by 0.6 to 1.8.
    """
    started, training = time.time(), model.training
    config = text_config(model)
    device = next(model.parameters()).device
    half = device.type == "cuda" or model.get_input_embeddings().weight.dtype != torch.float32
    tolerance = 0.2 if half else 1e-4
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    pairs = probe_pairs(model.get_input_embeddings().weight.shape[0], max_length, window)

    def distance(packed):  # the largest difference from the model's own numbers
        batch = {k: v.to(device) for k, v in build_batch(pairs, 0, packed, max_length).items()}
        return (policy_logps(model, batch) - own).abs().max().item()

    model.eval()  # no dropout
    try:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            try:
                own = own_logps(model, pairs)
                padded = distance(False)
            except Exception as error:  # e.g. a module that LoRA cannot wrap (Llama-4's MoE router)
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                raise UsageError(f"{config.model_type}: scoring fails on this model with LoRA "
                                 f"({type(error).__name__}: {reason}); try --lora-target") from None
            if not padded <= tolerance:  # NaN too
                raise UsageError(f"{config.model_type}: simpo's log-probs differ from the model's own logits "
                                 f"by {padded:.3g} per token (tolerance {tolerance:g}): this model does "
                                 f"something after its last layer that simpo does not apply; refusing it")
            problem = shared_layout_problem(model, max_length)
            if problem is None:
                try:
                    packed = distance(True)
                except Exception as error:  # e.g. ALiBi models (Bloom) build their bias from a 2-D mask
                    problem = f"the packed layout fails on {config.model_type}: {type(error).__name__}"
                else:
                    if not packed <= tolerance:
                        problem = f"packed layout changes this model's numbers by {packed:.2g}"
    finally:
        model.train(training)
    checked = f"checked against the model's own logits in {time.time() - started:.1f} s"
    if problem:
        return False, f"batches: padded, each prompt computed twice ({problem}); {checked}"
    return True, f"batches: packed, each prompt computed once for chosen and rejected, no padding; {checked}"


def build_batch(examples, pad_id, shared=True, max_length=2048):
    """Pairs -> the inputs of `policy_logps`, for any ids given as lists or 1-D numpy arrays.

    shared=False: the padded layout of `data.collate` (2B right-padded rows [chosen..., rejected...]).
    shared=True: each pair is one segment [prompt, chosen, rejected] computed once: positions run 0..P+C-1
    then P..P+R-1, and a mask (built in `final_hidden`) lets rejected tokens see the prompt but never the
    chosen tokens, so every token sees exactly what it sees in the padded layout. Pairs share as few rows as
    hold at most 1.5 × `max_length` tokens each (a longer pair gets a row of its own), spread so that rows
    are nearly equal, and only the ends of rows are padded. The bound keeps each row's (T, T) mask small
    however many pairs a micro-batch holds, and the attention, which runs over the whole mask, at about
    what the padded rows cost (README, Performance).
    Both layouts carry `response_tokens` (2B,), the scored tokens of each sequence, and `sequence_tokens`
    (2B,), its prompt + response tokens (padding never counts).
    """
    prompts = [torch.as_tensor(e["prompt"], dtype=torch.long).reshape(-1) for e in examples]
    responses = [[torch.as_tensor(e[side], dtype=torch.long).reshape(-1) for e in examples]
                 for side in ("chosen", "rejected")]
    lengths = torch.tensor([[len(p), len(c), len(r)] for p, c, r in zip(prompts, *responses, strict=True)])
    # leading response ids that are prompt text (data.Examples) are read, not scored
    unscored = torch.tensor([list(e.get("unscored", (0, 0))) for e in examples]).reshape(-1, 2)
    # a response's first token is scored only if something precedes it (as labels[:, 1:] in the padded path)
    scored = lengths[:, 1:] - torch.maximum(unscored, (lengths[:, :1] == 0).long())
    counts = dict(response_tokens=scored.T.reshape(-1),
                  sequence_tokens=(lengths[:, :1] + lengths[:, 1:]).T.reshape(-1))
    if not shared:
        return {**data.collate(examples, pad_id), **counts}
    spans = lengths.sum(1).tolist()
    limit, order = max(3 * max_length // 2, *spans), sorted(range(len(examples)), key=lambda b: -spans[b])
    for n_rows in range(math.ceil(sum(spans) / limit), len(examples) + 1):  # the fewest rows that fit
        rows, filled = [[] for _ in range(n_rows)], [0] * n_rows
        for b in order:  # longest pair first, onto the emptiest row: rows come out nearly equal
            emptiest = filled.index(min(filled))
            rows[emptiest].append(b)
            filled[emptiest] += spans[b]
        if max(filled) <= limit:
            break
    shape = (len(rows), max(filled))
    input_ids, position_ids = torch.full(shape, pad_id), torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1)                  # which pair a token belongs to; -1: padding
    side = torch.zeros(shape, dtype=torch.int8)      # 0 prompt (or padding), 1 chosen, 2 rejected
    score_index, targets, sequence = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            P, C, R = lengths[b].tolist()
            end = start + P + C + R
            input_ids[r, start:end] = torch.cat([prompts[b], responses[0][b], responses[1][b]])
            position_ids[r, start:end] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
            segment[r, start:end] = b
            side[r, start + P:start + P + C], side[r, start + P + C:end] = 1, 2
            # The hidden state that predicts each response token is the one before it, except that the
            # first rejected token follows the prompt, not the chosen response.
            from_chosen = start + P - 1 + torch.arange(C)
            j = torch.arange(R)
            from_rejected = torch.where(j == 0, start + P - 1, start + P + C - 1 + j)
            for index, target, number, skip in ((from_chosen, responses[0][b], b, unscored[b, 0]),
                                                (from_rejected, responses[1][b], len(examples) + b,
                                                 unscored[b, 1])):
                # an empty prompt: a response's first token has no predictor
                keep = (index >= start) & (torch.arange(len(index)) >= skip)
                score_index.append(r * shape[1] + index[keep])
                targets.append(target[keep])
                sequence.append(torch.full_like(target[keep], number))
            start = end
    return dict(input_ids=input_ids, position_ids=position_ids, segment=segment, side=side,
                score_index=torch.cat(score_index), targets=torch.cat(targets), sequence=torch.cat(sequence),
                **counts)


def shared_attention_mask(batch, dtype=None):
    """(rows, 1, T, T) mask of a shared-layout batch: token q may see token k of the same pair at or before
    it, if k is in the prompt or on q's own side (so rejected never sees chosen). Bool (True = may attend)
    for SDPA; with `dtype`, additive (0 / most negative), which eager attention needs. Padding sees earlier
    padding, so no row of the mask is empty."""
    segment, side = batch["segment"], batch["side"]
    rows, width = segment.shape
    allowed = torch.empty(rows, 1, width, width, dtype=torch.bool, device=segment.device)
    for r in range(rows):  # a row at a time: the temporaries are one (T, T), not one per row
        torch.eq(segment[r, :, None], segment[r, None, :], out=allowed[r, 0])
        allowed[r, 0] &= (side[r, None, :] == 0) | (side[r, None, :] == side[r, :, None])
        allowed[r, 0].tril_()
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def final_hidden(model, batch):
    """Final hidden states (rows, T, H) and the lm_head arguments of simpo.project_logits: no logits
    computed. Takes either layout of `build_batch` (and `data.collate`'s, which is the padded one)."""
    if "segment" in batch:  # shared layout: explicit positions and mask
        # eager attention reads a bool mask wrongly
        eager = text_config(model)._attn_implementation == "eager"
        dtype = model.get_input_embeddings().weight.dtype
        if eager and torch.is_autocast_enabled(batch["input_ids"].device.type):
            dtype = torch.get_autocast_dtype(batch["input_ids"].device.type)
        inputs = dict(position_ids=batch["position_ids"],
                      attention_mask=shared_attention_mask(batch, dtype if eager else None))
    else:
        inputs = dict(attention_mask=batch["attention_mask"])
    decoder = decoder_of(model)
    # no KV cache: nothing is generated
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state
    head = model.get_output_embeddings()
    return hidden, dict(lm_head_weight=head.weight, lm_head_bias=head.bias,
                        logit_softcap=getattr(text_config(model), "final_logit_softcapping", None))


def policy_logps(model, batch, average=True, chunk_size=1024):
    """Per-sequence response log-probs (2B,), ordered [chosen..., rejected...], from one forward pass over a
    batch of `build_batch` (either layout)."""
    hidden, head = final_hidden(model, batch)
    if "labels" in batch:  # padded: one row per sequence
        return simpo.chunked_sequence_logps(hidden, labels=batch["labels"], average=average,
                                            chunk_size=chunk_size, **head)
    token_logps = simpo.chunked_token_logps(hidden.flatten(0, 1)[batch["score_index"]],
                                            targets=batch["targets"], chunk_size=chunk_size, **head)
    logps = torch.zeros(len(batch["response_tokens"]), dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, batch["sequence"], token_logps)  # sum per sequence, not per row
    return logps / batch["response_tokens"].clamp(min=1) if average else logps


@torch.no_grad()
def pair_logps(model, examples, pad_id, batch_size, average=True, desc="scoring", packed=None):
    """Log-probs (averaged per token unless `average=False`) of every chosen and rejected response: two (N,)
    float32 tensors on the CPU. `packed`: the layout `choose_layout` chose (None: what the config allows)."""
    device, chosen, rejected = next(model.parameters()).device, [], []
    longest = max((len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in examples), default=0)
    shared = shared_layout_problem(model, longest) is None if packed is None else packed
    # under torchrun, one progress bar: the first process's
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=parallel.rank() > 0):
        batch = build_batch(examples[i:i + batch_size], pad_id, shared, longest)
        batch = {k: v.to(device) for k, v in batch.items()}
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
