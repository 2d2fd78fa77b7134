"""A ReAct agent on ChatGemmaMTP: LangChain's create_agent with two tools. Streams the answer's tokens
and the tool calls as they are verified, and prints the speculative stats of every model call.

    python examples/agents/react_agent.py                  # Gemma 4 E2B with its MTP assistant
    python examples/agents/react_agent.py --offline-demo   # a tiny model that memorized this run

create_agent comes from the `langchain` package (`pip install langchain`; the dev extra has it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from langchain.agents import create_agent
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_setup import chat_model, parser, stats_line

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.testing import Transcript, tool_loop, tool_options

QUESTION = "What is the weather in Paris right now, in Fahrenheit?"
WEATHER = {"Paris": "sunny, 21C", "Rome": "cloudy, 17C"}


@tool
def get_weather(city: str) -> str:
    """Current weather in a city, with the temperature in Celsius."""
    return WEATHER.get(city, "no data for this city")


@tool
def celsius_to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from Celsius to Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)


TOOLS = [get_weather, celsius_to_fahrenheit]


def offline_transcripts() -> list[Transcript]:
    """What --offline-demo's model memorizes: this agent's three model calls (the tools really run)."""
    calls = [(get_weather, {"city": "Paris"}), (celsius_to_fahrenheit, {"celsius": 21})]
    return tool_loop(QUESTION, calls, "It is sunny in Paris, at 21C, which is 69.8F.", tool_options(TOOLS))


def run(llm: ChatGemmaMTP, question: str) -> list:
    """Run the agent, printing tokens and tool calls as they stream; return the final messages."""
    agent = create_agent(llm, tools=TOOLS)
    calls, speaking, open_call, final = 0, False, False, None
    print(f"user: {question}")
    for mode, payload in agent.stream({"messages": [HumanMessage(question)]}, stream_mode=["messages", "values"]):
        if mode == "values":
            final = payload["messages"]
            continue
        chunk, metadata = payload
        if isinstance(chunk, ToolMessage):
            print(f"  <- {chunk.name} returned {chunk.content}")
        elif isinstance(chunk, AIMessageChunk) and metadata["langgraph_node"] == "model":
            if chunk.content:
                print("" if speaking else "agent: ", chunk.content, sep="", end="", flush=True)
                speaking = True
            for piece in chunk.tool_call_chunks:  # a call streams as its name, then its arguments
                if piece["name"]:
                    print("), " if open_call else "\n  -> " if speaking else "  -> ", piece["name"], "(", sep="", end="")
                    open_call = True
                print(piece["args"] or "", end="", flush=True)
            if chunk.chunk_position == "last":
                calls += 1
                print(")" if open_call else "", f"\n  [model call {calls}] {stats_line(chunk)}", sep="")
                speaking = open_call = False
    return final


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    llm = chat_model(args, offline_transcripts)
    messages = run(llm, QUESTION)
    return 0 if messages and not messages[-1].tool_calls else 1


if __name__ == "__main__":
    sys.exit(main())
