"""Writes a distillation text corpus from what this Python installation holds: code and prose, offline.

Code: excerpts of the standard library's modules. Prose: excerpts of the installed packages'
descriptions (their READMEs, Markdown or reStructuredText). Half of the records are plain text and
half a chat turn (a short request, the excerpt as the model's reply), so the drafter sees the chat
format around both kinds. `gemma-mtp distill --data` labels every position with the target's own
prediction (one teacher-forced forward per window: far cheaper than generating text).
With `--echo`, each excerpt is short and repeated six times, the request being the excerpt itself:
text only copying predicts, as the embedded 270M's echo-and-loop replies are (the drafter's
weakest case, docs/research-notes.md). With `--random-words`, each record is 6-24 random words of the
embedded model's vocabulary written 2-4 times: nothing but copying predicts the later copies, which
tests whether a drafter can learn to copy at all. Deterministic for a given installation and seed.

    python -m benchmarks.distill.make_corpus --out /tmp/corpus-270m.jsonl --records 1500
    python -m benchmarks.distill.make_corpus --out /tmp/echo-270m.jsonl --records 800 --echo
    python -m benchmarks.distill.make_corpus --out /tmp/words-270m.jsonl --records 1500 --random-words --seed 5
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "pydoc_data", "encodings"}
CODE_REQUESTS = [
    "Show me some code from Python's `{name}` module.",
    "Write part of a Python module like the standard library's `{name}`.",
    "How is `{name}` implemented in Python? Show the code.",
]
ECHO_CHARS = (120, 200, 300)  # excerpt sizes of --echo records: six copies fill one or two 256-token windows
PROSE_REQUESTS = [
    "Tell me about the {name} Python package.",
    "Write the documentation for {name}.",
    "What is {name} and how do I use it?",
]


def code_sources() -> list[tuple[str, str]]:
    """(module name, source) for the standard library's pure-Python modules, tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 2000:
            out.append((".".join(rel.with_suffix("").parts), text))
    return out


def prose_sources() -> list[tuple[str, str]]:
    """(distribution name, description) for installed packages with a README-sized description."""
    out = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        text = meta.get_payload() or meta.get("Description") or ""
        if len(text) > 2000 and meta["Name"]:
            out[meta["Name"].lower()] = text
    return sorted(out.items())


def excerpt(text: str, rng: random.Random, chars: int) -> str:
    """About `chars` characters of whole lines from a random line of `text`."""
    lines = text.splitlines()
    start = rng.randrange(max(1, len(lines) - 5))
    out, size = [], 0
    for line in lines[start:]:
        if size + len(line) > chars and out:
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out).strip("\n")


def records(n: int, chars: int, seed: int, echo: bool = False) -> list[dict]:
    rng = random.Random(seed)
    kinds = [("code", code_sources(), CODE_REQUESTS), ("prose", prose_sources(), PROSE_REQUESTS)]
    out = []
    for i in range(n):
        kind, sources, requests = kinds[i % 2]
        name, text = rng.choice(sources)
        body = excerpt(text, rng, rng.choice(ECHO_CHARS) if echo else chars)
        if len(body) < (40 if echo else chars // 4):
            continue
        reply = "\n".join([body] * 6) if echo else body
        if rng.random() < 0.5:
            out.append({"kind": kind, "text": reply})
        else:
            request = body if echo else rng.choice(requests).format(name=name)
            out.append({"kind": kind, "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]})
    return out


def random_word_records(n: int, seed: int) -> list[dict]:
    """Random whole-word tokens of the embedded model's vocabulary, joined by one random separator,
    the line written 2-4 times."""
    from transformers import AutoTokenizer

    from langchain_gemma_mtp.embedded import embedded_model_dir

    vocab = AutoTokenizer.from_pretrained(str(embedded_model_dir())).get_vocab()
    words = sorted({w[1:] for w in vocab if w.startswith("\u2581") and re.fullmatch(r"[A-Za-z_]{3,12}", w[1:])})
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picked = rng.sample(words, rng.randint(6, 24))
        line = rng.choice([" ", ", ", "_", ".", "(", " = ", "\n"]).join(picked)
        out.append({"kind": "words", "text": "\n".join([line] * rng.randint(2, 4))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--records", type=int, default=1500)
    ap.add_argument("--chars", type=int, default=800, help="about this many characters per excerpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--echo", action="store_true", help="short excerpts repeated six times (copying), --chars unused")
    ap.add_argument("--random-words", action="store_true", help="random vocabulary words written 2-4 times (pure copying)")
    args = ap.parse_args()
    if args.random_words:
        recs = random_word_records(args.records, args.seed)
    else:
        recs = records(args.records, args.chars, args.seed, args.echo)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    print(f"{len(recs)} records ({sum(r['kind'] == 'code' for r in recs)} code) -> {args.out}")


if __name__ == "__main__":
    main()
