"""The Engine: a target, a drafter and per-hint draft schedules; token ids in, verified bursts out."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel

from ..draft_settings import MTP_DRAFTERS
from ..engine_spec import DEFAULT_PREFIX_CACHE_MB, EngineSpec, mtp_settings_refused
from ..errors import InvalidRequestError
from .cache import PrefixCache
from .constraint import Grammar, compile_lark, grammar_tokenizer
from .drafters import Drafter, DraftModelDrafter, HybridDrafter, MTPDrafter, NgramDrafter, NoDrafter
from .heap import freeze_heap
from .loading import (
    find_assistant,
    is_assistant_checkpoint,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    stop_ids_of,
    validate_draft_model,
    validate_mtp_pair,
)
from .loop import speculative_decode
from .memory import HEADROOM, KVBudget, default_kv_cache_mb, kv_bytes_per_position
from .processors import LogitsProcessing
from .schedule import DraftScheduler
from .target import TargetModel
from .types import EngineCounters, GenerationRequest, GenerationResult, SamplingParams, SpeculativeStats
from .worker import EngineWorker, RequestHandle

log = logging.getLogger(__name__)


class Engine:
    """Speculative decoding over a transformers target with a pluggable drafter."""

    def __init__(
        self,
        target: PreTrainedModel | TargetModel,
        drafter: Drafter | None = None,
        tokenizer: Any = None,  # a transformers tokenizer, used duck-typed (decode, encode, chat template)
        *,
        stop_token_ids: Iterable[int] | None = None,
        name: str | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        kv_cache_mb: float | None = None,
    ):
        self.target = target if isinstance(target, TargetModel) else TargetModel(target)
        self.model = self.target.model.eval()
        self.drafter: Drafter = drafter or NoDrafter()
        self.tokenizer = tokenizer
        self.name = name or getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        self.stop_token_ids = frozenset(stop_token_ids) if stop_token_ids is not None else stop_ids_of(self.model)
        self.scheduler = DraftScheduler(self.drafter.cost_per_draft_token)
        # KV of recent requests, so agent steps that resend the same history prefill only what is new.
        self.prefix_cache = PrefixCache(prefix_cache_mb)
        # KV of running requests: each reserves what it can grow to before its first forward.
        self.kv_budget = KVBudget(0)
        if kv_cache_mb is None:  # the screen's copy, still packing, counts as taken
            kv_cache_mb = default_kv_cache_mb(self.device, prefix_cache_mb, self.target.packing_bytes)
        self.limit_kv_cache(kv_cache_mb)
        self.kv_bytes_per_position = kv_bytes_per_position(self.target)
        draft_model = getattr(self.drafter, "model", None)  # a separate draft model keeps a cache of its own
        if isinstance(draft_model, TargetModel):
            self.kv_bytes_per_position += kv_bytes_per_position(draft_model)
        self.worker = EngineWorker.for_device(self.device)
        self.counters = EngineCounters()  # totals for metrics, written by the owner thread only
        self.spec: EngineSpec | None = None  # how it was built, when built from one (`from_spec`)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        drafter: str = "auto",
        assistant: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        gguf_file: str | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        kv_cache_mb: float | None = None,
        mtp_stop_below: float | None = None,
        mtp_siblings: int | None = None,
        load_options: Mapping[str, Any] | None = None,
    ) -> Engine:
        """Load a target and pair it with a drafter (`EngineSpec.of` checks the arguments first).

        drafter: "auto" (hybrid when an MTP assistant is given or found as `X-assistant`, a draft
        model when `assistant` is an ordinary causal LM, else n-gram), "mtp", "hybrid" (long
        n-gram matches copied, short ones while they beat MTP, MTP otherwise), "draft_model", "ngram" or "none". prefix_cache_mb: memory for the KV caches of recent requests (0 disables).
        kv_cache_mb: memory for the KV caches of running requests together (None: half the memory
        free after loading, less prefix_cache_mb); a request that could never fit is refused with
        KVCacheLimitError, one that does not fit now waits for running requests to finish.
        mtp_stop_below: the MTP drafter stops a draft once the product of its own probabilities falls
        below this (`MTPDrafter`; None: the draft schedule's choice from measured costs, 0: always draft k).
        mtp_siblings: runners-up per draft depth that greedy requests verify beside the MTP draft
        as a tree (None: the draft schedule's choice from measured costs, 0: the chain alone).
        load_options: passed on to `from_pretrained` (`revision`, `token`, `attn_implementation`,
        `trust_remote_code`); the drafter gets all but `revision`, which names the target's version.
        """
        spec = EngineSpec.of(
            model,
            drafter,
            assistant,
            device,
            dtype,
            gguf_file=gguf_file,
            mtp_stop_below=mtp_stop_below,
            mtp_siblings=mtp_siblings,
            load_options=load_options,
            prefix_cache_mb=prefix_cache_mb,
        )
        return cls.from_spec(spec, kv_cache_mb=kv_cache_mb)

    @classmethod
    def from_spec(cls, spec: EngineSpec, *, kv_cache_mb: float | None = None) -> Engine:
        """Build the engine a spec names: resolve its drafter, load the target, build the drafter."""
        spec = resolve_drafter(spec)
        dev = resolve_device(spec.device)
        dt = resolve_dtype(spec.dtype, dev)
        target_model, tokenizer = load_causal_lm(spec.model, dev, dt, spec.gguf_file, dict(spec.load_options))
        target = TargetModel(target_model)
        target.pack_screen()  # in the background, while the drafter and the rest load
        chosen = build_drafter(spec, target)
        log.info("loaded %s with drafter %s (%s, %s)", spec.model, chosen.name, dev, dt)
        engine = cls(target, chosen, tokenizer, name=spec.model, prefix_cache_mb=spec.cache_mb, kv_cache_mb=kv_cache_mb)
        engine.spec = spec
        freeze_heap(engine)  # what loading left alive stays out of Python's full collections (engine/heap.py)
        return engine

    def __repr__(self) -> str:
        c = self.scheduler.costs.snapshot()
        source = "measured" if c["measured"] else "prior"
        return (
            f"Engine({self.name!r}, drafter={self.drafter.name!r}, device={self.device.type}, "
            f"forward={c['forward_s'] * 1e3:.1f} ms, row=+{c['row_s'] * 1e3:.2f} ms, draft_token={c['draft_token_s'] * 1e3:.2f} ms, "
            f"draft_call={c['draft_call_s'] * 1e3:.2f} ms, "
            f"costs={source}: row {c['row_cost']:.3f} draft {c['draft_cost']:.3f} call {c['draft_call_cost']:.3f} of a forward)"
        )

    def limit_kv_cache(self, mb: float) -> None:
        """Let running requests hold at most `mb` MB of KV cache together, from their next admission on."""
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
            raise InvalidRequestError(f"kv_cache_mb must be a number > 0 (the KV cache running requests may hold together), got {mb!r}.")
        self.kv_budget.limit_bytes = int(mb * 2**20)

    def forget(self) -> None:
        """Drop what earlier calls' texts left (the prefix cache, the drafter's index): the next call
        copies nothing from them. Call it between unrelated workloads or before timing single calls.
        The draft schedule keeps its measured costs and each hint kind's acceptance: they describe
        the machine and the kind of text, not a call's words."""
        self.prefix_cache.clear()
        self.drafter.forget()

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def max_positions(self) -> int | None:
        """The target's context length in tokens (prompt plus new tokens), if its config says."""
        return self.target.max_positions

    def make_request(
        self,
        prompt_ids: Iterable[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        num_draft_tokens: int | None = None,
        draft_hint: str | int | None = None,
        stop_token_ids: Iterable[int] | None = None,
        *,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        constraint: Grammar | None = None,
    ) -> GenerationRequest:
        """A validated request; raises InvalidRequestError before any forward pass."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        request = GenerationRequest(
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(float(temperature), float(top_p), int(top_k) if top_k is not None else 0, _number("min_p", min_p)),
            seed=seed,
            num_draft_tokens=num_draft_tokens,
            draft_hint=draft_hint,
            stop_token_ids=frozenset(stop_token_ids) if stop_token_ids is not None else self.stop_token_ids,
            processing=LogitsProcessing(frequency_penalty, presence_penalty, repetition_penalty, _bias_copy(logit_bias), min_tokens),
            constraint=constraint,
        )
        request.validate(self.target.vocab_size, self.max_positions)
        return request

    def grammar(self, lark: str, what: str = "the grammar", prefix: Iterable[int] = ()) -> Grammar:
        """A Lark grammar (llguidance's dialect: `%json{...}` parts, special tokens as `<[id]>`)
        compiled for this engine's tokenizer, for `constraint=`; `prefix`: its first tokens, which
        the prompt already ends with. GrammarError naming `what` if it cannot be compiled."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"{self.name} has no tokenizer: a grammar needs one; pass tokenizer= to the Engine.")
        return compile_lark(lark, grammar_tokenizer(self.tokenizer), what, list(prefix))

    def kv_bytes(self, request: GenerationRequest) -> int:
        """The KV cache a request can grow to: every position it may hold at once, in every layer that stores K/V."""
        return (len(request.prompt_ids) + request.max_new_tokens + HEADROOM) * self.kv_bytes_per_position

    def submit(self, prompt_ids: Iterable[int], **kwargs) -> RequestHandle:
        """Queue a request on the engine's owner thread; iterate the handle (sync or async) for
        bursts of verified tokens, one per target forward. Arguments as `generate`; a bad request
        raises InvalidRequestError here, before any forward pass."""
        return self.submit_request(self.make_request(prompt_ids, **kwargs))

    stream = submit

    def submit_request(self, request: GenerationRequest) -> RequestHandle:
        """Queue a validated request; KVCacheLimitError if its KV cache could never fit the budget."""
        kv_bytes = self.kv_bytes(request)
        self.kv_budget.check(kv_bytes, len(request.prompt_ids), request.max_new_tokens)
        stats = SpeculativeStats(drafter=self.drafter.name)
        policy = self.scheduler.policy(request, can_draft=not isinstance(self.drafter, NoDrafter))
        generator = None
        if not request.sampling.greedy:
            generator = torch.Generator(device=self.device)
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        bursts = speculative_decode(self.target, self.drafter, request, policy, stats, generator, self.prefix_cache)
        return self.worker.submit(bursts, stats, request.prompt_ids, self.counters, self.kv_budget, kv_bytes)

    def generate(self, prompt_ids: Iterable[int], **kwargs) -> GenerationResult:
        """Generate new token ids.

        kwargs: max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
        num_draft_tokens=None (fixed draft length for this call), draft_hint=None ("code",
        "prose", "tool_call", "long_form", "auto" or an int), stop_token_ids=None (default: the
        checkpoint's eos ids).

        Keyword-only processors, applied to the target's logits at every verified position so
        the output stays that of plain decoding with them (engine/processors.py): min_p=0.0
        (sampling only), frequency_penalty=0.0 and presence_penalty=0.0 (OpenAI, over generated
        tokens, in [-2, 2]), repetition_penalty=1.0 (HF/vLLM, over prompt and output, > 0),
        logit_bias=None ({token id: bias in [-100, 100]}), min_tokens=0 (stop tokens are banned
        until this many tokens were generated), constraint=None (a `Grammar` the output must
        match, from `Engine.grammar`; engine/constraint.py).
        """
        return self.submit(prompt_ids, **kwargs).result()

    async def agenerate(self, prompt_ids: Iterable[int], **kwargs) -> GenerationResult:
        """`generate` for asyncio: awaits the owner thread without blocking the event loop."""
        return await self.submit(prompt_ids, **kwargs).aresult()


def _bias_copy(logit_bias: Mapping[int, float] | None) -> Mapping[int, float]:
    """A copy of a logit_bias mapping (the request must not change under it); anything else as given, for validation to name."""
    return dict(logit_bias) if isinstance(logit_bias, Mapping) else {} if logit_bias is None else logit_bias


def _number(name: str, value: object) -> float:
    """`value` as a float, or InvalidRequestError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}.")
    return float(value)


__all__ = ["Engine"]


def resolve_drafter(spec: EngineSpec) -> EngineSpec:
    """The spec with "auto" resolved and the MTP assistant found (`X-assistant` beside the model).

    "auto": hybrid when an MTP assistant is given or found, a draft model when `assistant` is an
    ordinary causal LM, else n-gram. MTP settings on an engine that ends up drafting otherwise are
    refused, naming the fix.
    """
    drafter, assistant = spec.drafter, spec.assistant
    token = dict(spec.load_options).get("token")
    if (drafter == "auto" or drafter in MTP_DRAFTERS) and assistant is None:
        assistant = find_assistant(spec.model, token)
        if assistant is None and drafter != "auto":
            raise InvalidRequestError(
                f"drafter={drafter!r} needs an MTP assistant, and none was given or found beside {spec.model} "
                "(looked for X-assistant): pass assistant=<dir or hub id>."
            )
    if drafter == "auto":
        if assistant is None:
            drafter = "ngram"
        else:
            drafter = "hybrid" if is_assistant_checkpoint(assistant, token) else "draft_model"
    if spec.mtp_given and drafter not in MTP_DRAFTERS:
        raise mtp_settings_refused(spec.mtp_given, drafter)
    return replace(spec, drafter=drafter, assistant=assistant)


def build_drafter(spec: EngineSpec, target: TargetModel) -> Drafter:
    """The drafter a resolved spec names, for `target`: the one place drafters are built from names.

    Assistants load on the target's device and dtype, with the spec's load options but `revision`
    (which names the target's version).
    """
    options = {k: v for k, v in spec.load_options if k != "revision"}
    dtype = target.dtype
    assistant = spec.assistant  # resolve_drafter found one for the drafters that need one, or refused them
    if spec.drafter in MTP_DRAFTERS:
        assert assistant is not None
        helper, _ = load_causal_lm(assistant, target.device, dtype, options=options)
        validate_mtp_pair(target, helper)
        mtp = MTPDrafter(helper, target, spec.mtp_stop_below, spec.mtp_siblings)
        return HybridDrafter(mtp, NgramDrafter()) if spec.drafter == "hybrid" else mtp
    if spec.drafter == "draft_model":
        assert assistant is not None
        draft_lm, _ = load_causal_lm(assistant, target.device, dtype, options=options)
        draft = TargetModel(draft_lm)
        validate_draft_model(target, draft)
        return DraftModelDrafter(draft)
    if spec.drafter == "ngram":
        return NgramDrafter()
    return NoDrafter()
