"""A supervisor and two workers in one LangGraph graph, on one ChatGemmaMTP: the supervisor hands tasks
off with tools, a coder node drafts with draft_hint="code" and a writer node with draft_hint="prose",
and each node's draft acceptance is printed at the end.

All nodes share one engine (one model in memory); each hint keeps its own acceptance statistics in
the engine, so the coder's draft lengths adapt to code and the writer's to prose, apart.

    python examples/agents/multi_agent.py                  # Gemma 4 E2B with its MTP assistant
    python examples/agents/multi_agent.py --offline-demo   # a tiny model that memorized this run
"""

from __future__ import annotations

import operator
import sys
from pathlib import Path
from typing import Annotated, Any

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_setup import chat_model, parser

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.testing import TURN_END, Transcript, call_text, tool_options

TASK = "Add a Python function is_prime(n) to our utils module, and write a short changelog entry for it."
SUPERVISOR = (
    "You lead a small team. Hand each part of the user's request to the right teammate with a handoff "
    "tool, one part at a time. When every part is done, tell the user briefly what was done."
)
CODER = "You write clean, correct Python. Answer with one code block and nothing else."
WRITER = "You write release notes: short, plain sentences for users, no code."


class ToCoder(BaseModel):
    """Hand a programming task to the coder."""

    task: str = Field(description="what to write, in one sentence")


class ToWriter(BaseModel):
    """Hand a writing task to the writer; the latest code is attached for them."""

    task: str = Field(description="what to write, in one sentence")


HANDOFFS = {"ToCoder": "coder", "ToWriter": "writer"}


class Team(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]  # the supervisor's conversation
    code: str  # the coder's latest answer, attached to the writer's task
    calls: Annotated[list[tuple[str, AIMessage]], operator.add]  # (node, reply) of every model call


# -- what each node sends to the model (the offline transcripts are built from the same functions) --


def supervisor_input(messages: list[BaseMessage]) -> list[BaseMessage]:
    return [SystemMessage(SUPERVISOR), *messages]


def coder_input(task: str) -> list[BaseMessage]:
    return [SystemMessage(CODER), HumanMessage(task)]


def writer_input(task: str, code: str) -> list[BaseMessage]:
    return [SystemMessage(WRITER), HumanMessage(f"{task}\n\nThe code:\n{code}")]


def handoff_result(call: dict[str, Any], answer: str) -> ToolMessage:
    """The worker's answer, returned to the supervisor as the result of its handoff call."""
    return ToolMessage(answer, tool_call_id=call["id"], name=call["name"])


def build_graph(llm: ChatGemmaMTP):
    supervisor = llm.bind_tools([ToCoder, ToWriter], draft_hint="tool_call")
    coder = llm.bind(draft_hint="code")
    writer = llm.bind(draft_hint="prose")

    def supervise(state: Team) -> Command:
        reply = supervisor.invoke(supervisor_input(state["messages"]))
        known = [c for c in reply.tool_calls if c["name"] in HANDOFFS]
        goto = HANDOFFS[known[0]["name"]] if known else END
        return Command(goto=goto, update={"messages": [reply], "calls": [("supervisor", reply)]})

    def work(state: Team, model, name: str) -> dict:
        call = state["messages"][-1].tool_calls[0]
        task = call["args"]["task"]
        reply = model.invoke(coder_input(task) if name == "coder" else writer_input(task, state.get("code", "")))
        update: dict = {"messages": [handoff_result(call, reply.content)], "calls": [(name, reply)]}
        if name == "coder":
            update["code"] = reply.content
        return update

    graph = StateGraph(Team)
    graph.add_node("supervisor", supervise, destinations=("coder", "writer", END))
    graph.add_node("coder", lambda state: work(state, coder, "coder"))
    graph.add_node("writer", lambda state: work(state, writer, "writer"))
    graph.add_edge(START, "supervisor")
    graph.add_edge("coder", "supervisor")
    graph.add_edge("writer", "supervisor")
    return graph.compile()


# -- the offline demo's memorized run ------------------------------------------------------------------

OFFLINE_CODE_TASK = "Write is_prime(n) for the utils module."
OFFLINE_WRITE_TASK = "Write a two-sentence changelog entry for the new is_prime function."
OFFLINE_CODE = (
    '```python\ndef is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n'
    "    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
    "        if n % d == 0:\n            return False\n    return True\n```"
)
OFFLINE_NOTE = (
    "Added is_prime(n) to the utils module: it tells you whether a whole number is prime. "
    "Numbers below 2 are never prime, and larger ones are checked quickly up to their square root."
)
OFFLINE_SUMMARY = "Done: the coder added is_prime(n) to utils, and the writer wrote its changelog entry."


def offline_transcripts() -> list[Transcript]:
    """What --offline-demo's model memorizes: the five model calls of this graph's run."""
    options = tool_options([ToCoder, ToWriter], draft_hint="tool_call")
    history: list[BaseMessage] = [HumanMessage(TASK)]
    transcripts = []
    steps = [
        ("ToCoder", OFFLINE_CODE_TASK, coder_input(OFFLINE_CODE_TASK), OFFLINE_CODE),
        ("ToWriter", OFFLINE_WRITE_TASK, writer_input(OFFLINE_WRITE_TASK, OFFLINE_CODE), OFFLINE_NOTE),
    ]
    for i, (tool, task, worker_input, answer) in enumerate(steps):
        transcripts.append(Transcript(supervisor_input(history), call_text(tool, {"task": task}), options))
        transcripts.append(Transcript(worker_input, answer + TURN_END))
        call = {"name": tool, "args": {"task": task}, "id": f"call_{i}", "type": "tool_call"}
        history += [AIMessage("", tool_calls=[call]), handoff_result(call, answer)]
    transcripts.append(Transcript(supervisor_input(history), OFFLINE_SUMMARY + TURN_END, options))
    return transcripts


# -- run and report ------------------------------------------------------------------------------------


def node_table(calls: list[tuple[str, AIMessage]]) -> list[str]:
    """Per node: its hints, model calls, drafted and accepted tokens, acceptance, tokens per forward."""
    rows = [f"{'node':<11}{'hint':<11}{'calls':>6}{'drafted':>9}{'accepted':>10}{'acceptance':>12}{'tokens/forward':>16}"]
    for node in dict.fromkeys(name for name, _ in calls):
        stats = [m.response_metadata["speculative"] for name, m in calls if name == node]
        tokens = sum(m.usage_metadata["output_tokens"] for name, m in calls if name == node)
        drafted, accepted = sum(s["drafted"] for s in stats), sum(s["accepted"] for s in stats)
        forwards = sum(s["target_forwards"] for s in stats)
        hints = ",".join(dict.fromkeys(str(s["draft_hint"]) for s in stats))
        rate = accepted / drafted if drafted else 0.0
        rows.append(f"{node:<11}{hints:<11}{len(stats):>6}{drafted:>9}{accepted:>10}{rate:>12.0%}{tokens / forwards:>16.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    llm = chat_model(args, offline_transcripts)
    print(f"user: {TASK}\n")
    calls: list[tuple[str, AIMessage]] = []
    for update in build_graph(llm).stream({"messages": [HumanMessage(TASK)]}, {"recursion_limit": 12}, stream_mode="updates"):
        for change in update.values():
            for name, reply in change.get("calls", ()):
                said = reply.content or ", ".join(f"{c['name']}({c['args']})" for c in reply.tool_calls)
                print(f"[{name}] {said}\n")
                calls.append((name, reply))
    print("\n".join(node_table(calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
