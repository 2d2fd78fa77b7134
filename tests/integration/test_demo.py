"""`gemma-mtp demo`'s agent team, run on a tiny Gemma 4 that memorized the team's four answers
(plumbing, not quality): the graph runs end to end through ChatGemmaMTP, the callback handler sees
every verified burst, the table's counts add up to those bursts, and the baseline graph on plain
transformers `generate` runs and agrees token for token in float32. The real command on the
embedded model is the slow test in test_embedded.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from langchain_gemma_mtp import cli, demo
from langchain_gemma_mtp.testing import TOKENIZER_DIR, TURN_END, Transcript, memorizing_chat_model

REPO = Path(__file__).resolve().parents[2]

SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺"
FROM_SUPERSCRIPT = str.maketrans(SUPERSCRIPTS, "0123456789+")

# What the memorizing model answers at each node; the reviewer hands the code back edited.
CODE = "```python\ndef slugify(title):\n    return '-'.join(title.lower().split())\n```"
ANSWERS = {
    "planner": "1. Lowercase the title.\n2. Join its words with dashes.",
    "coder": CODE,
    "reviewer": CODE.replace("):\n", '):\n    """The URL slug of a title."""\n', 1),
    "writer": "Call slugify(title) to get the slug of a title, e.g. for its URL.",
}


def team_transcripts() -> list[Transcript]:
    """Each node's request as the demo's graph sends it (after the answers before it), and its answer."""
    work: dict[str, str] = {}
    transcripts = []
    for node in demo.NODES:
        transcripts.append(Transcript(demo.node_messages(node, work), ANSWERS[node.name] + TURN_END))
        work[node.name] = ANSWERS[node.name]
    return transcripts


@pytest.fixture(scope="module")
def team_model() -> str:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for node in demo.NODES:  # each answer ends by itself, inside its node's token budget
        assert len(tokenizer.encode(ANSWERS[node.name] + TURN_END, add_special_tokens=False)) < node.max_tokens
    return str(memorizing_chat_model(team_transcripts()))


def sections(out: str) -> dict[str, str]:
    """Each node's streamed text (burst marks included), by node."""
    found = dict(re.findall(r"^\[(planner|coder|reviewer|writer)\]\n(.*?)(?=^\[|^node )", out, re.MULTILINE | re.DOTALL))
    assert list(found) == [n.name for n in demo.NODES]
    return found


def bursts(text: str) -> list[int]:
    return [int(n) for mark in re.findall(f"[{SUPERSCRIPTS}]+", text) for n in mark.translate(FROM_SUPERSCRIPT).split("+")]


# node, hint, tokens, tok/s, plain tok/s (absent with --no-compare), acceptance, mean accepted, draft lengths
ROW = re.compile(r"^(planner|coder|reviewer|writer) +(\S+) +(\d+) +([\d.]+)(?: +([\d.]+))? +(\d+)% +([\d.]+)  (.*)$", re.MULTILINE)


def test_the_team_graph_streams_every_burst_and_the_table_adds_up(team_model, capsys) -> None:
    assert cli.main(["demo", "--model", team_model, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    streamed = sections(out)
    for name, text in streamed.items():  # the graph ran end to end: each node answered in turn
        assert text.translate({ord(c): None for c in SUPERSCRIPTS}).strip() == ANSWERS[name]

    rows = {row[0]: row[1:] for row in ROW.findall(out)}
    assert [(name, rows[name][0]) for name in rows] == [(n.name, str(n.hint)) for n in demo.NODES]
    for name, (_, tokens, _tps, plain_tps, acceptance, mean, lengths) in rows.items():
        assert float(plain_tps) > 0  # the baseline's own row entry
        sizes = bursts(streamed[name])
        # The handler saw every burst: their sizes add up to the call's output tokens.
        assert sum(sizes) == int(tokens) > len(sizes)
        # One burst per target forward: the prefill's first token, then one per verification step.
        steps = {int(n): int(c) for n, c in re.findall(r"(\d+)x(\d+)", lengths)}
        assert sum(steps.values()) == len(sizes) - 1
        drafted = sum(n * c for n, c in steps.items())
        # Mean accepted length and acceptance count the same accepted drafts, out of the listed draft
        # lengths; at least those the bursts kept (drafts accepted past the stop token are counted
        # by the engine but not emitted).
        accepted = (float(mean) - 1) * (len(sizes) - 1)
        assert abs(100 * accepted / drafted - int(acceptance)) <= 1
        assert accepted >= sum(sizes) - len(sizes) - 0.01 * len(sizes)
    assert max(max(bursts(text)) for text in streamed.values()) > 1  # drafts were accepted

    # Each node's prompt starts with the previous one's: the engine prefilled only the new part.
    cached, prompts = map(int, re.search(r"prompt tokens read from the prefix cache: (\d+) of (\d+)", out).groups())
    assert 0 < cached < prompts
    ours = int(re.search(r"graph on ChatGemmaMTP: +(\d+) tokens in [\d.]+s", out)[1])
    assert ours == sum(int(row[1]) for row in rows.values())
    # The baseline ran the same graph on plain generate, to the same tokens (float32, greedy).
    assert int(re.search(r"graph on plain generate: +(\d+) tokens in [\d.]+s", out)[1]) == ours
    assert re.search(r"speedup: [\d.]+x   answers identical to plain greedy: all 4 nodes$", out, re.MULTILINE)
    assert "small *base* model" not in out  # that note is about the embedded model only


def test_no_compare_skips_the_baseline(team_model, capsys) -> None:
    assert cli.main(["demo", "--model", team_model, "--dtype", "float32", "--no-compare"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert "graph on ChatGemmaMTP:" in out and len(rows) == len(demo.NODES) and not any(row[4] for row in rows)
    assert "plain generate" not in out and "speedup" not in out


def test_the_single_prompt_view_streams_beside_plain_decoding(team_model, capsys) -> None:
    prompt = demo.node_messages(demo.NODES[0], {})[-1].content
    assert cli.main(["demo", "--model", team_model, "--dtype", "float32", "--prompt", prompt, "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "--- plain decoding (same model, same loop, no drafter) ---" in out
    assert re.search(r"speedup: [\d.]+x   outputs identical: True", out)


def test_agreement_names_the_first_node_that_differs_and_where() -> None:
    """What a bfloat16 run reports: the nodes that answered alike up to the first that did not."""
    same = {node.name: ANSWERS[node.name] for node in demo.NODES}
    ours = demo.GraphRun(same, {}, 1.0)
    assert demo.agreement(ours, ours) == "all 4 nodes"
    coder = demo.GraphRun({**same, "coder": ANSWERS["coder"][:20] + "X", "writer": "?"}, {}, 2.0)
    assert demo.agreement(ours, coder) == "planner (coder differs from character 20 on; the nodes after it read different work)"
    writer = demo.GraphRun({**same, "writer": ANSWERS["writer"][:9]}, {}, 2.0)
    assert demo.agreement(ours, writer) == "planner, coder, reviewer (writer differs from character 9 on)"


@pytest.mark.parametrize(
    ("preset", "import_torch_first", "expected"),
    [(None, False, cli.SPIN_COUNT), ("300000", False, "300000"), (None, True, None)],
    ids=["set", "the user's kept", "too late once torch loaded"],
)
def test_the_cli_sets_a_short_spin_count_before_torch_loads(preset, import_torch_first, expected) -> None:
    """A fresh interpreter, as the console command starts: libgomp reads GOMP_SPINCOUNT when torch
    loads, so the CLI sets it first, keeps a value the user set, and leaves it alone once too late."""
    code = (
        ("import torch\n" if import_torch_first else "")
        + "import os\nfrom langchain_gemma_mtp import cli\n"
        + "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        + "import torch\nprint(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split()[-1] == str(expected)
