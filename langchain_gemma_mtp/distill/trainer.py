"""The distillation run: options, data, teacher signals, a resumable training loop with held-out acceptance."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    PreTrainedModel,
)

from ..engine.loading import (
    ASSISTANT_MODEL_TYPES,
    load_causal_lm,
    resolve_checkpoint,
    validate_mtp_pair,
)
from ..engine.target import KV_LAYERS_KEY, SHARED_HEAD_FLAG, TargetModel, bind_shared_head, kv_layer_problems
from ..errors import DistillError, IncompatibleDrafterError
from .architecture import (
    assistant_config,
    assistant_weights,
    build_assistant,
    save_assistant,
)
from .data import check_files, generated_sequences, prompt_list, text_sequences
from .objective import (
    FULL_SOFTMAX_MAX_VOCAB,
    TeacherBatch,
    expected_accepted_length,
    heldout_acceptance,
    teacher_batch,
    unrolled_loss,
)

STATE_FILE = "distill-state.pt"  # resumable state: step, weights, optimizer, options
DATA_FILE = "distill-data.pt"  # the token sequences, so a resume does not regenerate them
SUMMARY_FILE = "distill.json"
TOP_M = 64  # the target's candidates per position in the sampled softmax
NEGATIVES = 1024  # random negatives shared by all positions of a step
WARMUP = 20  # optimizer steps of linear learning-rate warm-up
# The drafter's shape when neither the options nor --init say otherwise.
ARCHITECTURE_DEFAULTS = {"layers": 2, "centroids": 0, "centroid_top_k": 32}
# Options that define the drafter and its data: a resume must keep them.
_IDENTITY = (
    "target",
    "init",
    "data",
    "prompts",
    "tokens",
    "layers",
    "hidden",
    "intermediate",
    "draft_steps",
    "centroids",
    "centroid_top_k",
    "seq_len",
    "temperature",
    "heldout",
    "seed",
    "dtype",
    "query_weight",
    "kv_layers",
)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class DistillOptions:
    """What `gemma-mtp distill` takes; see the CLI help for each."""

    target: str
    out: str
    init: str | None = None  # an existing drafter to start from; its shape replaces the defaults below
    data: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    tokens: int = 50_000
    layers: int | None = None  # None: ARCHITECTURE_DEFAULTS, or --init's
    hidden: int | None = None
    intermediate: int | None = None
    draft_steps: int = 4
    centroids: int | None = None
    centroid_top_k: int | None = None
    query_weight: float = 0.0  # weight of the query-matching loss (unrolled_loss); 0: tokens only
    kv_layers: dict[str, int] = field(default_factory=dict)  # target layer read per layer type; {}: the last of each (or --init's)
    steps: int = 300
    lr: float = 1e-3
    seq_len: int = 256
    batch: int = 1
    gen_batch: int = 16
    temperature: float = 0.0
    heldout: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    save_dtype: str = "float32"
    dtype: str = "float32"  # the target's, for generating text and teacher signals (the drafter trains in fp32)
    seed: int = 0
    resume: bool = False
    progress: bool = True


@dataclass
class DistillResult:
    out: Path
    assistant: Gemma4AssistantForCausalLM  # the trained drafter, in memory, bound to the run's target
    steps: int
    losses: list[float]
    acceptance: list[float]  # held-out, per draft position
    mean_accepted_length: float  # tokens per target forward at k = draft_steps, from `acceptance`


def resolve_architecture(o: DistillOptions) -> DistillOptions:
    """The options with the drafter's shape filled in: from --init's config when given (a shape
    option that contradicts it is an error), else the defaults."""
    if o.init is None:
        filled: dict[str, Any] = {k: v if getattr(o, k) is None else getattr(o, k) for k, v in ARCHITECTURE_DEFAULTS.items()}
        return replace(o, **filled)
    config = AutoConfig.from_pretrained(resolve_checkpoint(o.init))
    if config.model_type not in ASSISTANT_MODEL_TYPES:
        raise DistillError(
            f"--init {o.init} is a {config.model_type!r} model, not a Gemma 4 MTP assistant: "
            "pass a drafter directory (an earlier `gemma-mtp distill --out`, or a released X-assistant)."
        )
    tc = config.get_text_config()
    shape = {
        "layers": tc.num_hidden_layers,
        "hidden": tc.hidden_size,
        "intermediate": tc.intermediate_size,
        "centroids": config.num_centroids if config.use_ordered_embeddings else 0,
        "centroid_top_k": config.centroid_intermediate_top_k,
    }
    clash = [f"--{k.replace('_', '-')} {getattr(o, k)} (it has {v})" for k, v in shape.items() if getattr(o, k) not in (None, v)]
    if clash:
        raise DistillError(
            f"--init {o.init} fixes the drafter's shape, and these options contradict it: {', '.join(clash)}. "
            "Drop them, or leave out --init to train a new shape."
        )
    return replace(o, **shape)


def check_options(o: DistillOptions) -> tuple[Path, object]:
    """Everything that can be checked before loading weights; returns the target dir and its text config."""
    assert o.layers is not None and o.centroids is not None and o.centroid_top_k is not None  # resolve_architecture ran
    positive = {
        "tokens": o.tokens,
        "layers": o.layers,
        "draft_steps": o.draft_steps,
        "steps": o.steps,
        "seq_len": o.seq_len,
        "batch": o.batch,
        "gen_batch": o.gen_batch,
        "eval_every": o.eval_every,
        "save_every": o.save_every,
    }
    for name, value in positive.items():
        if value < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if o.seq_len < 16:
        raise DistillError(f"--seq-len {o.seq_len} is too short to learn from: use 64 or more.")
    if not (o.lr > 0):
        raise DistillError(f"--lr must be positive, got {o.lr}.")
    if not o.query_weight >= 0:
        raise DistillError(f"--query-weight must be 0 or more, got {o.query_weight}.")
    if not 0 < o.heldout < 1:
        raise DistillError(f"--heldout is a fraction of the sequences, got {o.heldout}: use e.g. 0.1.")
    for name in ("save_dtype", "dtype"):
        if getattr(o, name) not in ("float32", "bfloat16"):
            raise DistillError(f"--{name.replace('_', '-')} must be float32 or bfloat16, got {getattr(o, name)!r}.")
    if not o.data and not o.prompts:
        raise DistillError(
            "no training text: pass --data FILES (text to train on) and/or --prompts FILES (prompts the target continues itself)."
        )
    check_files(o.data, "--data")
    check_files(o.prompts, "--prompts")
    path = resolve_checkpoint(o.target)
    tc = AutoConfig.from_pretrained(path).get_text_config()
    vocab = tc.vocab_size
    if o.centroids:
        if o.centroids > vocab or vocab % o.centroids:
            raise DistillError(
                f"--centroids {o.centroids} must divide the target's vocabulary of {vocab} tokens "
                "(e.g. 2048 for 262144); 0 drafts over the full vocabulary."
            )
        if not 1 <= o.centroid_top_k <= o.centroids:
            raise DistillError(f"--centroid-top-k {o.centroid_top_k} must be between 1 and --centroids {o.centroids}.")
    if o.hidden is not None and o.hidden < 1:
        raise DistillError(f"--hidden must be positive, got {o.hidden}.")
    if o.hidden not in (None, tc.hidden_size) and vocab > FULL_SOFTMAX_MAX_VOCAB:
        raise DistillError(
            f"--hidden {o.hidden} differs from the target's {tc.hidden_size}: the drafter would need its own "
            f"{vocab}-row head. Leave --hidden unset to share the target's LM head."
        )
    layer_types = getattr(tc, "layer_types", None) or []
    if "full_attention" not in layer_types:
        raise DistillError(f"target {o.target} has no full-attention layers to share K/V from: it is not a Gemma 3/4 model.")
    unknown = [t for t in o.kv_layers if t not in LAYER_TYPES]
    if unknown:
        raise DistillError(f"--kv-layer: unknown layer type {unknown[0]!r}: use {' or '.join(LAYER_TYPES)}.")
    problems = kv_layer_problems(layer_types, hasattr(tc, "kv_sharing_modes"), o.kv_layers)
    if problems:
        raise DistillError(f"--kv-layer: {'; '.join(problems)}. Name a target layer of that type (0-based).")
    state = Path(o.out) / STATE_FILE
    if o.resume and not state.is_file():
        raise DistillError(f"--resume: no {STATE_FILE} in {o.out}; run once without --resume to start.")
    if not o.resume and state.is_file():
        raise DistillError(f"{o.out} holds an earlier run ({STATE_FILE}): pass --resume to continue it, or another --out.")
    return path, tc


def _identity(o: DistillOptions) -> dict:
    return {k: getattr(o, k) for k in _IDENTITY}


def _sequences(o: DistillOptions, target: PreTrainedModel, tokenizer, bar: bool) -> list[tuple[list[int], int | None]]:
    """(token ids, where the target's greedy continuation starts or None) per training sequence."""
    data_path = Path(o.out) / DATA_FILE
    if data_path.is_file():
        return torch.load(data_path)
    if tokenizer is None:
        raise DistillError(f"target {o.target} has no tokenizer: distillation reads text, so the checkpoint needs one.")
    seqs: list[tuple[list[int], int | None]] = [
        (ids, None) for ids in text_sequences(tokenizer, check_files(o.data, "--data"), o.seq_len, o.tokens)
    ]
    budget = o.tokens - sum(len(ids) for ids, _ in seqs)
    prompts = prompt_list(tokenizer, check_files(o.prompts, "--prompts"))
    if prompts and budget > 0:
        with tqdm(total=len(prompts), desc="generating text", unit="prompt", disable=not bar) as progress:
            seqs += generated_sequences(
                target,
                tokenizer,
                prompts,
                seq_len=o.seq_len,
                budget=budget,
                temperature=o.temperature,
                batch_size=o.gen_batch,
                seed=o.seed,
                progress=progress,
            )
    if len(seqs) < 2:
        raise DistillError("fewer than two training sequences: pass more text or prompts (one is held out).")
    random.Random(o.seed).shuffle(seqs)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seqs, data_path)
    return seqs


def _warmup(step: int) -> float:
    """Linear warm-up over the first WARMUP steps, then the constant rate: a run resumed with more
    --steps continues exactly where an uninterrupted one would be."""
    return min(1.0, (step + 1) / WARMUP)


def _trainable(assistant: PreTrainedModel, target: TargetModel) -> list[torch.nn.Parameter]:
    target_params = {id(p) for p in target.model.parameters()}
    return [p for p in assistant.parameters() if id(p) not in target_params]


def _save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _initial_assistant(o: DistillOptions, target: TargetModel) -> tuple[Gemma4AssistantForCausalLM, Gemma4AssistantConfig]:
    """A fresh assistant shaped for the target, or the --init one (checked against it, trained in fp32)."""
    if o.init is None:
        assert o.layers is not None and o.centroids is not None and o.centroid_top_k is not None  # resolve_architecture ran
        target.read_kv_from(o.kv_layers)
        config = assistant_config(
            target, layers=o.layers, hidden=o.hidden, intermediate=o.intermediate, centroids=o.centroids, centroid_top_k=o.centroid_top_k
        )
        if o.kv_layers:
            setattr(config, KV_LAYERS_KEY, dict(o.kv_layers))
        return build_assistant(target, config, seed=o.seed), config
    loaded, _ = load_causal_lm(o.init, target.device, torch.float32)
    assistant = cast(Gemma4AssistantForCausalLM, loaded)  # resolve_architecture checked its model type
    if o.kv_layers:  # the init's layers now read other target layers: their attention retrains
        setattr(assistant.config, KV_LAYERS_KEY, {**(getattr(assistant.config, KV_LAYERS_KEY, None) or {}), **o.kv_layers})
    try:
        validate_mtp_pair(target, assistant)
    except IncompatibleDrafterError as exc:
        raise DistillError(f"--init {o.init} cannot start a drafter for {o.target}: {exc}") from None
    target.pair(assistant)  # reads the K/V layers it names; binds a shared head to this target's
    return assistant, assistant.config


def distill(o: DistillOptions) -> DistillResult:
    """Train (or resume training) a Gemma4Assistant drafter for `o.target`; save it to `o.out`."""
    o = resolve_architecture(o)
    check_options(o)
    out = Path(o.out)
    state_path = out / STATE_FILE
    state = torch.load(state_path, weights_only=False) if o.resume else None
    # runs saved before an option existed
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(DistillOptions)}
    changed = [k for k in _IDENTITY if state["options"].get(k, defaults[k]) != getattr(o, k)] if state is not None else []
    if changed:
        raise DistillError(
            f"--resume with different options ({', '.join(changed)}) than the run in {out}: keep them, or start a new --out."
        )
    model, tokenizer = load_causal_lm(o.target, torch.device("cpu"), getattr(torch, o.dtype))
    model.requires_grad_(False)  # frozen: no 262k-row gradients for the shared embedding/head
    target = TargetModel(model)
    if state is None:  # before the text and teacher passes, so a mismatched --init fails fast
        assistant, config = _initial_assistant(o, target)
    else:
        config = Gemma4AssistantConfig.from_dict(state["config"])
        target.read_kv_from(getattr(config, KV_LAYERS_KEY, None) or {})
    seqs = _sequences(o, model, tokenizer, o.progress)
    n_held = max(1, round(len(seqs) * o.heldout))
    top_m = TOP_M if target.vocab_size > FULL_SOFTMAX_MAX_VOCAB else 0
    # Only greedy continuations say the target's prediction without its head; sampled ones do not.
    greedy = o.temperature == 0
    query_types = sorted(set(config.get_text_config().layer_types)) if o.query_weight else ()
    batches = [
        teacher_batch(target, ids, top_m, start if greedy else None, query_types)
        for ids, start in tqdm(seqs, desc="teacher", unit="seq", disable=not o.progress)
    ]
    train, held = batches[n_held:], batches[:n_held]

    if state is not None:
        assistant = Gemma4AssistantForCausalLM(config)
        if getattr(config, SHARED_HEAD_FLAG, False):
            bind_shared_head(assistant, target)
        assistant.load_state_dict(state["assistant"], strict=False)
    params = _trainable(assistant, target)
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    start, losses = 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]

    def checkpoint(step: int) -> None:
        _save_state(
            state_path,
            step=step,
            options=_identity(o),
            config=config.to_dict(),
            assistant=assistant_weights(assistant),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            losses=losses,
        )

    def evaluate(step: int) -> list[float]:
        assistant.eval()
        rates = heldout_acceptance(assistant, target, held, o.draft_steps)
        assistant.train()
        bar.write(
            f"step {step}: loss {losses[-1] if losses else float('nan'):.3f}, held-out acceptance per draft "
            f"position [{' '.join(f'{r:.2f}' for r in rates)}], mean accepted length at k={o.draft_steps}: "
            f"{expected_accepted_length(rates):.2f}"
        )
        return rates

    assistant.train()
    bar = tqdm(total=o.steps, initial=min(start, o.steps), desc="distill", unit="step", disable=not o.progress)
    for step in range(start, o.steps):
        g = torch.Generator().manual_seed(o.seed * 1_000_003 + step)  # a resumed run draws the same negatives
        negatives = torch.randint(target.vocab_size, (NEGATIVES,), generator=g) if top_m else None
        batch_losses = [
            unrolled_loss(assistant, target, train[(step * o.batch + i) % len(train)], o.draft_steps, negatives, o.query_weight)
            for i in range(o.batch)
        ]
        loss = sum(batch_losses[1:], batch_losses[0]) / o.batch
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % o.eval_every == 0 and done < o.steps:
            evaluate(done)
        if done % o.save_every == 0:
            checkpoint(done)
    steps_done = max(start, o.steps)
    rates = evaluate(steps_done)
    bar.close()
    assistant.eval()
    checkpoint(steps_done)
    save_assistant(assistant, out, getattr(torch, o.save_dtype))
    summary = dict(
        options={k: v for k, v in asdict(o).items() if k not in ("resume", "progress")},
        steps=steps_done,
        train_sequences=len(train),
        heldout_sequences=len(held),
        train_tokens=sum(b.tokens.numel() for b in train),
        final_loss=losses[-1] if losses else None,
        heldout_acceptance=rates,
        heldout_mean_accepted_length=expected_accepted_length(rates),
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return DistillResult(out, assistant, steps_done, losses, rates, expected_accepted_length(rates))


def distill_assistant(
    assistant: Gemma4AssistantForCausalLM,
    target: TargetModel,
    sequences: Iterable[Sequence[int]],
    *,
    steps: int = 200,
    draft_steps: int = 4,
    lr: float = 3e-3,
) -> list[float]:
    """Train `assistant` in place on the target's own predictions over `sequences`; return the losses."""
    batches: list[TeacherBatch] = [teacher_batch(target, s) for s in sequences]
    opt = torch.optim.AdamW(_trainable(assistant, target), lr=lr)
    assistant.train()
    history = []
    for step in range(steps):
        loss = unrolled_loss(assistant, target, batches[step % len(batches)], draft_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assistant.eval()
    return history
