"""A RAG agent that embeds on its main thread and answers with ChatGemmaMTP: the answer's speed with
and without the embedding model's torch work on that thread.

The agent indexes its documents (the workloads' message texts) with a local transformers encoder on
the main thread, then for each question embeds it there, retrieves the two nearest documents and
asks ChatGemmaMTP (the embedded Gemma 3 270M) on the same thread. The encoder is a BERT of
all-MiniLM-L6 size (6 layers, 384 wide) built from its config with random weights, so nothing is
downloaded: its retrieval is arbitrary, but its cost (and the OpenMP team it leaves on the main
thread) is a real embedding model's. Ids come from the chat model's tokenizer, folded into the
encoder's vocabulary.

In interleaved rounds, every answer a cold call (`engine.forget()` first, so neither arm reads the
other's prefix cache):
- `with embedding`: embed the question on the main thread, then answer (the thread holds a team);
- `without embedding`: the same messages answered with no torch work on the main thread since.
Goal: answers with the embedding model less than 3% slower (x0.97 or more of the speed without).

    python -m benchmarks.rag_embed_bench --out benchmarks/results/rag-embed-270m-bf16.json
    python -m benchmarks.rag_embed_bench --max-new 4 --repeats 1 --questions 1     # smoke run
"""

from __future__ import annotations

import json
import time

import torch
from transformers import BertConfig, BertModel

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.embedded import embedded_model_dir
from langchain_gemma_mtp.engine import Engine

from .common import parser, set_threads, timed_rounds, workloads, write_results

QUESTIONS = (
    "Which function computes Fibonacci numbers, and how should it handle large inputs?",
    "What does the quoted passage say about the weather tool?",
    "Summarize the email's request in one sentence.",
)


class Embedder:
    """A MiniLM-sized BERT encoder with random weights: mean-pooled, normalized sentence vectors."""

    def __init__(self, tokenizer, max_tokens: int = 256):
        torch.manual_seed(0)
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        self.model = BertModel(config).eval()
        self.tokenizer = tokenizer
        self.vocab = config.vocab_size
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = [[i % self.vocab for i in self.tokenizer.encode(t)][: self.max_tokens] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return torch.nn.functional.normalize(pooled, dim=-1)


def documents() -> list[str]:
    """The workloads' non-empty message texts: a small corpus of code, prose and tool notes."""
    return [m["content"] for w in workloads() for m in w.get("messages", []) if m.get("content")]


def messages(question: str, docs: list[str]) -> list[tuple[str, str]]:
    notes = "\n\n".join(docs)
    return [("system", f"Answer from these notes only.\n\n{notes}"), ("human", question)]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    engine = Engine.from_pretrained(embedded_model_dir(), drafter=args.drafter, dtype=args.dtype)
    chat = ChatGemmaMTP(engine=engine, temperature=0.0, max_tokens=args.max_new)
    embed = Embedder(engine.tokenizer)
    corpus = documents()
    index = embed(corpus)  # the agent indexes its documents on the main thread
    questions = list(QUESTIONS[: args.questions])

    def retrieve(question: str) -> list[str]:
        scores = index @ embed([question])[0]
        return [corpus[i] for i in scores.topk(2).indices.tolist()]

    prompts = {q: messages(q, retrieve(q)) for q in questions}  # the documents each question retrieves

    def answer(question: str) -> tuple[int, float]:
        engine.forget()
        start = time.perf_counter()
        reply = chat.invoke(prompts[question])
        return reply.usage_metadata["output_tokens"], time.perf_counter() - start

    def with_embedding() -> tuple[dict, float]:
        tokens, secs, embed_secs = 0, 0.0, 0.0
        for q in questions:
            start = time.perf_counter()
            retrieve(q)  # embeds the question on this thread (the same documents as prompts[q]'s)
            embed_secs += time.perf_counter() - start
            n, s = answer(q)
            tokens, secs = tokens + n, secs + s
        return {"tokens": tokens, "embed_seconds": embed_secs}, secs / tokens

    def without_embedding() -> tuple[dict, float]:
        tokens, secs = 0, 0.0
        for q in questions:
            n, s = answer(q)
            tokens, secs = tokens + n, secs + s
        return {"tokens": tokens}, secs / tokens

    answer(questions[0])  # warm up kernels outside the timings
    rounds = timed_rounds([with_embedding, without_embedding], args.repeats)
    rows = {name: dict(info, seconds_per_token=min(secs)) for name, (info, secs) in zip(("with embedding", "without embedding"), rounds)}
    ratio = rows["without embedding"]["seconds_per_token"] / rows["with embedding"]["seconds_per_token"]
    print(
        f"\n## RAG agent, embedding on the main thread, Gemma 3 270M (embedded), {args.dtype}, drafter {args.drafter}, {args.threads} threads\n"
    )
    print("| answers | time per token | speed vs without |\n|---|---|---|")
    for name, row in rows.items():
        vs = f"x{ratio:.3f}" if name == "with embedding" else ""
        print(f"| {name} | {row['seconds_per_token'] * 1e3:.1f} ms | {vs} |")
    print(json.dumps({"question_tokens": {n: r["tokens"] for n, r in rows.items()}}))
    write_results(args.out, args, rows=rows, speed_with_vs_without=ratio)


if __name__ == "__main__":
    main()
