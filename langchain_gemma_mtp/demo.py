"""`gemma-mtp demo`: a small LangGraph team on ChatGemmaMTP, streamed burst by burst, beside plain `generate`.

A planner, a coder, a reviewer that returns the code edited and a writer run one after another in
one LangGraph graph; each node has its own draft hint and sees the work so far. Their answers
stream through a LangChain callback handler that marks every verified burst with its size; then a
table shows each node's speed and drafting, and the same graph runs again on plain transformers
`generate` (what ChatHuggingFace does: the whole prompt prefilled every call, one token per
forward, greedy) for the speedup measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable
from langgraph.graph import END, START, StateGraph
from transformers.generation.streamers import BaseStreamer
from typing_extensions import TypedDict

from .chat_models import ChatGemmaMTP
from .engine import Engine, on_short_lived_thread
from .messages import from_langchain
from .runtime import ChatRequest, ChatRuntime

TASK = "Write a Python function slugify(title) that turns a title into a lowercase URL slug."
TEAM = (
    "You are one member of a small software team: a planner, a coder, a reviewer and a writer work on "
    "the task below in turn, each reading the work so far."
)

BASE_MODEL_NOTE = (
    "Note: the embedded model is Gemma 3 270M, a small *base* model (pretrained only, not instruction-tuned, "
    "dequantized from 4-bit). It continues text rather than following the nodes' instructions, so read the "
    "answers for the mechanics (verified bursts, per-node draft hints, prefix reuse between nodes) and the "
    "speed, not for their quality."
)
REAL_PAIR_NOTE = (
    "With a real Gemma 4 instruction-tuned pair (gemma-mtp demo --model google/gemma-4-E2B-it, its MTP "
    "assistant found as google/gemma-4-E2B-it-assistant or given with --assistant), the nodes follow their "
    "instructions and the assistant drafts from the target's own hidden state (hybrid drafter), so "
    "acceptance comes from predicting the answer rather than from copying earlier text."
)
SUPERSCRIPT = str.maketrans("0123456789+", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺")


@dataclass(frozen=True)
class Node:
    """One member of the team: its draft hint, its token budget and what it is asked to add."""

    name: str
    hint: str | int
    max_tokens: int
    instruction: str
    heading: str  # the heading its answer gets in the work the next nodes read


NODES = (
    Node("planner", "prose", 48, "Planner: list the steps to do the task, briefly.", "Plan"),
    Node("coder", "code", 96, "Coder: write the Python code for the task, following the plan.", "Code"),
    # The reviewer hands the code back edited: mostly a copy, which one fixed long draft fits.
    Node("reviewer", 8, 112, "Reviewer: return the code above in full, corrected, with a docstring.", "Reviewed code"),
    Node("writer", "long_form", 64, "Writer: write the README section that explains how to use the function.", "README"),
)


class Work(TypedDict, total=False):
    """The graph's state: each node's answer under its name."""

    planner: str
    coder: str
    reviewer: str
    writer: str


def node_messages(node: Node, work: Mapping[str, object], task: str = TASK) -> list[BaseMessage]:
    """What `node` sends the model: the team and task, the work so far, then its own instruction.

    Everything but the instruction is the previous node's prompt plus its answer, so each call
    starts with what the last one read and the prefix cache prefills only the new part."""
    parts = [f"Task: {task}"]
    for earlier in NODES:
        if earlier.name in work:
            parts.append(f"{earlier.heading}:\n{work[earlier.name]}")
    parts.append(node.instruction)
    return [SystemMessage(TEAM), HumanMessage("\n\n".join(parts))]


def build_graph(models: Mapping[str, Runnable], task: str = TASK):
    """The team as a LangGraph graph: START -> planner -> coder -> reviewer -> writer -> END; the
    state maps each node's name to its answer. `models` holds each node's chat model."""

    def step(node: Node):  # a LangGraph node: called with its state as `state`
        def run(state: Work) -> dict[str, str]:
            return {node.name: models[node.name].invoke(node_messages(node, state, task)).content}

        return run

    graph = StateGraph(Work)
    previous = START
    for node in NODES:
        graph.add_node(node.name, step(node))
        graph.add_edge(previous, node.name)
        previous = node.name
    graph.add_edge(previous, END)
    return graph.compile()


# -- watching the calls -----------------------------------------------------------------------------


@dataclass
class Call:
    """One model call seen by the callback handler."""

    node: str
    started: float
    bursts: list[int] = field(default_factory=list)  # verified tokens per burst, as streamed
    text: str = ""
    seconds: float = 0.0
    message: AIMessage | None = None

    @property
    def usage(self) -> UsageMetadata:
        """The finished call's token counts (both chat models here always report them)."""
        assert self.message is not None and self.message.usage_metadata is not None
        return self.message.usage_metadata


class BurstPrinter(BaseCallbackHandler):
    """Records every model call of a graph run (node, bursts, time, final message); with `out`,
    streams each call's text as it is verified, each burst followed by its size in superscript."""

    def __init__(self, out: TextIO | None = None, on_end: Callable[[Call], None] | None = None) -> None:
        self.out = out
        self.on_end = on_end
        self.calls: dict[UUID, Call] = {}

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list, *, run_id: UUID, metadata: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        node = (metadata or {}).get("langgraph_node", "model")
        self.calls[run_id] = Call(node, time.perf_counter())
        if self.out is not None:
            self.out.write(f"\n[{node}]\n")
            self.out.flush()

    # Narrower than the base class on purpose: a chat model streams str tokens in ChatGenerationChunks.
    def on_llm_new_token(  # type: ignore[override]
        self, token: str, *, chunk: ChatGenerationChunk | None = None, run_id: UUID, **kwargs: Any
    ) -> None:
        bursts = chunk.message.additional_kwargs.get("burst_sizes", []) if chunk is not None else []
        call = self.calls[run_id]
        mark = "+".join(map(str, bursts))
        if mark and not token and call.bursts:  # no text between this mark and the last one: keep them apart
            mark = "+" + mark
        call.bursts.extend(bursts)
        call.text += token
        if self.out is not None:
            self.out.write(token + mark.translate(SUPERSCRIPT))
            self.out.flush()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = self.calls[run_id]
        call.seconds = time.perf_counter() - call.started
        generation = response.generations[0][0]
        assert isinstance(generation, ChatGeneration) and isinstance(generation.message, AIMessage)  # a chat model's answer
        call.message = generation.message
        if self.out is not None:
            self.out.write("\n")
        if self.on_end is not None:
            self.on_end(call)

    def by_node(self) -> dict[str, Call]:
        return {call.node: call for call in self.calls.values()}


# -- the baseline -------------------------------------------------------------------------------------


class PlainGenerate(BaseChatModel):
    """The baseline: one transformers `generate` per call, as ChatHuggingFace runs a local model
    (the whole prompt prefilled every call, one token per forward, greedy). The prompt and the stop
    tokens are the runtime's, so both sides read and stop at the same tokens."""

    runtime: Any
    max_tokens: int = 512
    on_tokens: Callable[[int], None] | None = None
    """Told how many new tokens each forward produced (a progress bar)."""

    @property
    def _llm_type(self) -> str:
        return "transformers-generate"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        import torch

        runtime: ChatRuntime = self.runtime
        request = ChatRequest(messages=from_langchain(messages), max_tokens=kwargs.get("max_tokens", self.max_tokens))
        prompt = runtime.prepare(request).prompt_ids
        stops = sorted(runtime.stop_token_ids)
        model = runtime.engine.model

        @torch.inference_mode()
        def generate() -> list[int]:
            ids = torch.tensor([prompt], device=runtime.engine.device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=request.max_tokens,
                eos_token_id=stops,
                pad_token_id=stops[0],
                streamer=None if self.on_tokens is None else _NewTokens(self.on_tokens),
            )
            return out[0, len(prompt) :].tolist()

        # A thread that ends with the call keeps no OpenMP team beside the engine's owner thread.
        new = on_short_lived_thread(generate)
        text = runtime.tokenizer.decode(
            [t for t in new if t not in runtime.stop_token_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        usage = {"input_tokens": len(prompt), "output_tokens": len(new), "total_tokens": len(prompt) + len(new)}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text, usage_metadata=usage))])


class _NewTokens(BaseStreamer):
    """A `generate` streamer that reports how many new tokens each step made (the prompt comes first)."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if self.prompt_seen:
            self.report(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        pass


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class GraphRun:
    """One run of the team's graph: its answers by node, every call as the handler saw it, wall time."""

    answers: dict[str, str]
    calls: dict[str, Call]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(call.usage["output_tokens"] for call in self.calls.values())


def run_graph(models: Mapping[str, Runnable], handler: BurstPrinter, task: str = TASK) -> GraphRun:
    start = time.perf_counter()
    answers = build_graph(models, task).invoke({}, {"callbacks": [handler]})
    return GraphRun(answers, handler.by_node(), time.perf_counter() - start)


def draft_lengths(lengths: Sequence[int]) -> str:
    """Draft lengths with how often each was used: "0x3 4x12" (0: a step with no draft)."""
    return " ".join(f"{n}x{count}" for n, count in sorted(collections.Counter(lengths).items()))


def node_table(ours: GraphRun, plain: GraphRun | None) -> list[str]:
    """One row per node: hint, tokens, tokens/s (and plain generate's), acceptance, mean accepted
    length (tokens per target forward) and the draft lengths used."""
    head = f"{'node':<10}{'hint':<11}{'tokens':>7}{'tok/s':>8}"
    head += f"{'plain tok/s':>13}" if plain else ""
    rows = [head + f"{'acceptance':>12}{'mean accepted':>15}  draft lengths (length x steps)"]
    for node in NODES:
        call = ours.calls[node.name]
        assert call.message is not None  # set when the call ended
        spec = call.message.response_metadata["speculative"]
        tokens = call.usage["output_tokens"]
        row = f"{node.name:<10}{spec['draft_hint']!s:<11}{tokens:>7}{tokens / call.seconds:>8.1f}"
        if plain:
            base = plain.calls[node.name]
            row += f"{base.usage['output_tokens'] / base.seconds:>13.1f}"
        rows.append(row + f"{spec['acceptance_rate']:>12.0%}{spec['mean_accepted_length']:>15.2f}  {draft_lengths(spec['draft_lengths'])}")
    return rows


def agreement(ours: GraphRun, plain: GraphRun) -> str:
    """Which nodes answered exactly as plain greedy did, up to the first that did not (and where):
    the nodes after that one read different work, so their answers are not comparable."""
    same: list[str] = []
    for node in NODES:
        a, b = ours.answers[node.name], plain.answers[node.name]
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            later = "; the nodes after it read different work" if node is not NODES[-1] else ""
            return f"{', '.join(same) or 'none'} ({node.name} differs from character {at} on{later})"
        same.append(node.name)
    return f"all {len(NODES)} nodes"


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine `--model/--assistant/--drafter/--dtype` ask for (default: the embedded model with
    its shipped drafter when mtp or hybrid is asked for)."""
    from .embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir

    model = args.model or str(embedded_model_dir())
    assistant = args.assistant
    if assistant is None and args.model is None and args.drafter in ("mtp", "hybrid"):
        assistant = EMBEDDED_ASSISTANT_DIR  # the drafter distilled for the embedded model, shipped with the package
    return Engine.from_pretrained(
        model,
        drafter=args.drafter,
        assistant=assistant,
        dtype=args.dtype,
        mtp_stop_below=args.mtp_stop_below,
        mtp_siblings=args.mtp_siblings,
    )


def warm_up(engine: Engine, runtime: ChatRuntime) -> None:
    """One short call on each side, outside the timings (kernels, allocator), leaving no state behind.
    Ours takes a few steps: its first forward waits for a float32 target's fp16 greedy screen, whose
    copy of the head loading packs in the background (4 s on the 270M), and the screen is tried from
    the second greedy step; both once per process, as loading is."""
    ids = runtime.tokenizer.encode("Hello", add_special_tokens=False)[:4] or [0]
    engine.generate(ids, max_new_tokens=8)
    engine.forget()
    PlainGenerate(runtime=runtime, max_tokens=2).invoke("Hello")


def team_demo(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the team on ChatGemmaMTP, streamed, then (unless --no-compare) on plain `generate`; print
    the table and the speedup. Returns 1 when float32 answers differ from plain greedy's, else 0."""
    import torch
    from tqdm.auto import tqdm

    out = out or sys.stdout
    embedded = args.model is None
    print("loading the model...", file=out, flush=True)
    engine = load_engine(args)
    runtime = ChatRuntime(engine)
    exact = engine.target.dtype == torch.float32
    print(f"model: {engine.name}\ndrafter: {engine.drafter.name}  dtype: {engine.target.dtype}\n", file=out)
    if embedded:
        print(BASE_MODEL_NOTE + "\n" + REAL_PAIR_NOTE + "\n", file=out)
    print(f"task: {TASK}", file=out)
    print(
        "Each node streams its answer as verified bursts; the superscript after each burst is its size in "
        "tokens (one target forward each).",
        file=out,
        flush=True,
    )
    warm_up(engine, runtime)

    llm = ChatGemmaMTP(engine=engine, streaming=True)  # invoke streams: the handler sees every burst
    limit = args.max_tokens
    ours = run_graph({n.name: llm.bind(draft_hint=n.hint, max_tokens=limit or n.max_tokens) for n in NODES}, BurstPrinter(out))

    plain = None
    if args.compare:
        bar = tqdm(desc="the same graph on plain transformers generate", unit=" tokens", file=sys.stderr)
        baseline = PlainGenerate(runtime=runtime, on_tokens=bar.update)
        handler = BurstPrinter(on_end=lambda call: bar.set_postfix_str(f"{call.node} done"))
        plain = run_graph({n.name: baseline.bind(max_tokens=limit or n.max_tokens) for n in NODES}, handler)
        bar.close()

    print("\n" + "\n".join(node_table(ours, plain)), file=out)
    cached = sum(c.usage.get("input_token_details", {}).get("cache_read", 0) for c in ours.calls.values())
    prompts = sum(c.usage["input_tokens"] for c in ours.calls.values())
    print(f"\nprompt tokens read from the prefix cache: {cached} of {prompts}", file=out)
    print(f"graph on ChatGemmaMTP:    {ours.tokens} tokens in {ours.seconds:.2f}s", file=out)
    if plain is None:
        return 0
    print(f"graph on plain generate:  {plain.tokens} tokens in {plain.seconds:.2f}s (no prefix reuse, no drafting)", file=out)
    alike = agreement(ours, plain)
    print(f"speedup: {plain.seconds / ours.seconds:.2f}x   answers identical to plain greedy: {alike}", file=out)
    differ = ours.answers != plain.answers
    if differ and not exact:
        print(
            "(bfloat16: verifying several tokens in one forward rounds differently from one at a time, which can "
            "flip near-ties; --dtype float32 gives token identity)",
            file=out,
        )
    return 1 if differ and exact else 0


# -- the single-prompt view (--prompt) ------------------------------------------------------------------


def _prompt_ids(engine: Engine, prompt: str) -> list[int]:
    tok = engine.tokenizer
    if tok is None:
        raise SystemExit("this checkpoint has no tokenizer; the demo needs one to turn --prompt into ids")
    if tok.chat_template:
        return list(
            tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    return tok(prompt)["input_ids"]


def _stream(engine: Engine, ids: list[int], args: argparse.Namespace, out: TextIO):
    """Stream one decoding, printing text as bursts are verified; return (tokens, seconds, stats)."""
    tok = engine.tokenizer
    start = time.perf_counter()
    handle = engine.submit(ids, max_new_tokens=args.max_tokens or 96, draft_hint=args.draft_hint)
    printed = ""
    for _ in handle:
        text = tok.decode(handle.token_ids, skip_special_tokens=True)
        # Print only what is new; a trailing partial UTF-8 character waits for the next burst.
        if not text.endswith("\ufffd"):
            out.write(text[len(printed) :])
            out.flush()
            printed = text
    seconds = time.perf_counter() - start
    out.write("\n")
    return handle.token_ids, seconds, handle.stats


def prompt_demo(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """One prompt, decoded speculatively and then plainly by the same loop without a drafter."""
    import torch

    from .engine.drafters import NoDrafter

    out = out or sys.stdout
    engine = load_engine(args)
    plain = Engine(engine.model, NoDrafter(), engine.tokenizer, name=engine.name)
    ids = _prompt_ids(engine, args.prompt)
    print(f"model: {engine.name}  drafter: {engine.drafter.name}  dtype: {engine.target.dtype}  prompt: {len(ids)} tokens\n", file=out)
    plain.generate(ids[:8], max_new_tokens=2)  # warm up kernels once, outside the timings
    print(f"--- speculative ({engine.drafter.name}) ---", file=out)
    spec_ids, spec_s, stats = _stream(engine, ids, args, out)
    print("--- plain decoding (same model, same loop, no drafter) ---", file=out)
    plain_ids, plain_s, _ = _stream(plain, ids, args, out)
    spec_tps, plain_tps = len(spec_ids) / spec_s, len(plain_ids) / plain_s
    print(
        f"\nspeculative: {len(spec_ids)} tokens in {spec_s:.2f}s = {spec_tps:.1f} tok/s, "
        f"{stats.target_forwards} target forwards, acceptance {stats.acceptance_rate:.0%}, "
        f"mean accepted length {stats.mean_accepted_length:.2f}",
        file=out,
    )
    print(f"draft lengths: {draft_lengths(stats.draft_lengths)}", file=out)
    print(f"plain:       {len(plain_ids)} tokens in {plain_s:.2f}s = {plain_tps:.1f} tok/s", file=out)
    same = spec_ids == plain_ids
    print(f"speedup: {spec_tps / plain_tps:.2f}x   outputs identical: {same}", file=out)
    exact = engine.target.dtype == torch.float32
    if not same and not exact:
        print("(reduced precision: multi-token verification can flip near-ties; use --dtype float32 for identity)", file=out)
    return 0 if same or not exact else 1


def demo(args: argparse.Namespace) -> int:
    """`gemma-mtp demo`: the team's graph, or with --prompt the single-prompt view."""
    return prompt_demo(args) if args.prompt is not None else team_demo(args)
