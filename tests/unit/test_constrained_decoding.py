"""Grammar-constrained speculative decoding (engine/constraint.py): exact for the constrained distribution.

Greedy: with every drafter (n-gram, MTP chain, MTP tree, a draft model) and with jump-forward, the
float32 output equals constrained plain decoding token for token, computed here independently
(HF forward, one token at a time, masked by a fresh llguidance matcher). Sampled: the marginals of
constrained speculative sampling match the exact constrained marginals (chi-square), for sampled
drafts (whose forbidden tokens are kept to be rejected) and point-mass drafts (cut before them).
Random-weight tiny models, so the grammar, not the model, decides what is valid.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from test_engine_sampling import P_MIN, _chi2_ok, exact_marginals
from tiny_models import SMALL_VOCAB
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.constraint import Grammar
from langchain_gemma_mtp.engine.drafters import DraftModelDrafter, MTPDrafter, NgramDrafter, NoDrafter
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.types import SamplingParams
from langchain_gemma_mtp.engine.verify import process_logits
from langchain_gemma_mtp.errors import GrammarError, InvalidRequestError
from langchain_gemma_mtp.formats.gemma4 import Gemma4OutputParser
from langchain_gemma_mtp.formats.grammar import OutputShape, gemma4_grammar, json_part
from langchain_gemma_mtp.formats.streaming import ParsedDelta
from langchain_gemma_mtp.testing import TOKENIZER_DIR, build_chat_target
from langchain_gemma_mtp.testing.tiny import build_assistant

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 12},
        "qty": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["item", "qty", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_parts():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    target = build_chat_target(seed=11)
    return target, build_assistant(target, ordered=False, seed=12), tokenizer


def _grammars(engine: Engine) -> dict[str, Grammar]:
    vocab = engine.tokenizer.get_vocab()
    call = gemma4_grammar(OutputShape([WEATHER], strict=True, calls_only=True, single_call=True), vocab.__getitem__)
    return {"gemma4_call": engine.grammar(call), "json_schema": engine.grammar(f"start: {json_part(ORDER_SCHEMA)}")}


def plain_constrained_greedy(model, prompt: list[int], grammar: Grammar, n: int) -> list[int]:
    """Constrained plain decoding, independent of the engine: one HF forward per token, its logits
    masked by a fresh matcher, argmax; it ends where the grammar ends."""
    matcher = grammar.matcher()
    bits = allocate_token_bitmask(1, grammar.tokenizer.vocab_size)
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < n and not matcher.is_stopped():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            fill_next_token_bitmask(matcher, bits)
            allowed = torch.tensor([bool(bits[0, t // 32] >> (t % 32) & 1) for t in range(logits.numel())])
            allowed[list(grammar.tokenizer.eos_tokens)] = False  # no stop tokens in these requests
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            assert matcher.consume_token(token)
            ids.append(token)
            out.append(token)
    return out


def _drafter(name: str, target, assistant):
    tree = MTPDrafter(assistant, TargetModel(target), stop_below=0.0, siblings_per_depth=2)
    tree.sibling_min_chance = 0.0  # the untrained assistant is never sure enough to offer siblings otherwise
    return {
        "ngram": lambda: NgramDrafter(),
        "mtp": lambda: MTPDrafter(assistant, TargetModel(target), stop_below=0.0, siblings_per_depth=0),
        "mtp-tree": lambda: tree,
        "draft_model": lambda: DraftModelDrafter(TargetModel(build_chat_target(seed=13))),
    }[name]()


@pytest.mark.parametrize("grammar_name", ["gemma4_call", "json_schema"])
@pytest.mark.parametrize("drafter", ["ngram", "mtp", "mtp-tree", "draft_model"])
def test_constrained_greedy_speculation_equals_constrained_plain_decoding(chat_parts, drafter, grammar_name) -> None:
    target, assistant, tokenizer = chat_parts
    engine = Engine(target, _drafter(drafter, target, assistant), tokenizer, prefix_cache_mb=0)
    grammar = _grammars(engine)[grammar_name]
    drafted = siblings = 0
    for text in ("What is the weather?", "order two apples"):
        prompt = tokenizer.encode(text, add_special_tokens=True)
        expected = plain_constrained_greedy(target, prompt, grammar, 60)
        for jump_forward in (True, False):
            g = Grammar(grammar.tokenizer, grammar.text, jump_forward=jump_forward)
            result = engine.generate(prompt, max_new_tokens=60, constraint=g, num_draft_tokens=4, stop_token_ids=[])
            assert result.token_ids == expected, (drafter, grammar_name, jump_forward, tokenizer.decode(result.token_ids))
            assert result.finish_reason == ("stop" if len(expected) < 60 else "length")
            assert (result.stats.jump_forward_tokens > 0) == jump_forward
            drafted += result.stats.drafted - result.stats.jump_forward_tokens
            siblings += result.stats.sibling_tokens
    assert drafted > 0  # the drafter's own tokens were verified too, not only jump-forward ones
    assert (siblings > 0) == (drafter == "mtp-tree")  # trees: siblings the grammar allows were verified


@pytest.mark.parametrize("drafter", ["ngram", "mtp", "mtp-tree", "draft_model"])
def test_the_budget_ends_an_answer_of_calls_complete_and_speculation_stays_exact(chat_parts, drafter) -> None:
    """Calls, as many as the model likes, within small max_new_tokens: where another call would
    not fit (the tokens left are no more than the longest call so far) only the stop token is
    allowed, so every answer ends with it, its calls complete and valid. Greedy speculative output
    (jump-forward on) equals plain constrained decoding (one token a forward, no jump-forward)
    token for token. At least one answer would have gone on to another call with more room."""
    target, assistant, tokenizer = chat_parts
    plain = Engine(target, NoDrafter(), tokenizer, prefix_cache_mb=0)
    engine = Engine(target, _drafter(drafter, target, assistant), tokenizer, prefix_cache_mb=0)
    stop = [tokenizer.convert_tokens_to_ids("<turn|>")]
    schema = json.loads(json.dumps(WEATHER["function"]["parameters"]))
    schema["properties"]["days"].update(minimum=1, maximum=14)  # numbers are not capped (docs/tool-calling.md)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    went_on = 0
    for budget in (96, 150):  # a call without its string takes about 40 tokens in this vocabulary
        text = gemma4_grammar(
            OutputShape([tool], strict=True, calls_only=True, max_tokens=budget), engine.tokenizer.get_vocab().__getitem__
        )
        grammar = engine.grammar(text)
        for words in ("What is the weather?", "forecast"):
            prompt = tokenizer.encode(words, add_special_tokens=True)
            no_jump = Grammar(grammar.tokenizer, grammar.text, jump_forward=False)
            expected = plain.generate(prompt, max_new_tokens=budget, constraint=no_jump, stop_token_ids=stop)
            result = engine.generate(prompt, max_new_tokens=budget, constraint=grammar, num_draft_tokens=4, stop_token_ids=stop)
            assert result.token_ids == expected.token_ids, (drafter, budget, tokenizer.decode(result.token_ids))
            ids = result.token_ids[:-1]
            answer = tokenizer.decode(ids)
            assert result.finish_reason == "stop" and result.token_ids[-1] in stop, answer
            parser, parsed = Gemma4OutputParser({"get_weather"}), ParsedDelta()
            parsed.extend(parser.feed(answer))
            parsed.extend(parser.finish())
            assert parsed.tool_calls and not parsed.invalid_tool_calls and not parsed.content, answer
            for call in parsed.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schema)
            roomier = plain.generate(prompt, max_new_tokens=budget + 100, constraint=grammar, stop_token_ids=stop)
            assert roomier.token_ids[: len(ids)] == ids
            went_on += roomier.token_ids[len(ids)] not in stop
    assert went_on > 0  # the budget, not the model, ended those answers


def test_jump_forward_saves_forwards_and_keeps_the_output(chat_parts) -> None:
    """Plain decoding (no drafter) with jump-forward: the forced keys, markers and punctuation of a
    tool call come as drafts the masked target accepts, so fewer forwards give the same tokens."""
    target, _, tokenizer = chat_parts
    engine = Engine(target, NoDrafter(), tokenizer, prefix_cache_mb=0)
    grammar = _grammars(engine)["gemma4_call"]
    prompt = tokenizer.encode("weather please", add_special_tokens=True)
    on = engine.generate(prompt, max_new_tokens=80, constraint=grammar, stop_token_ids=[])
    off = engine.generate(
        prompt, max_new_tokens=80, constraint=Grammar(grammar.tokenizer, grammar.text, jump_forward=False), stop_token_ids=[]
    )
    assert on.token_ids == off.token_ids
    assert off.stats.target_forwards == len(off.token_ids)  # one token per forward
    assert on.stats.jump_forward_accepted >= len(tokenizer.encode("call:get_weather{city:", add_special_tokens=False))
    assert on.stats.target_forwards == len(on.token_ids) - on.stats.jump_forward_accepted


def test_the_output_stops_where_the_grammar_ends_and_keeps_to_it(chat_parts) -> None:
    target, _, tokenizer = chat_parts
    engine = Engine(target, NgramDrafter(), tokenizer, prefix_cache_mb=0)
    grammar = _grammars(engine)["json_schema"]
    prompt = tokenizer.encode("order", add_special_tokens=True)
    for seed in range(4):
        result = engine.generate(prompt, max_new_tokens=300, temperature=1.0, seed=seed, constraint=grammar)
        text = tokenizer.decode(result.token_ids)
        assert result.finish_reason == "stop", text
        order = json.loads(text)  # no stop token after it: the grammar's end ends the output
        assert set(order) == {"item", "qty", "tags"} and len(order["item"]) <= 12 and set(order["tags"]) <= {"a", "b"}
    unconstrained = engine.generate(prompt, max_new_tokens=30, temperature=1.0, seed=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(tokenizer.decode(unconstrained.token_ids))  # the random model left alone writes no JSON


def test_bad_grammars_and_constraints_fail_before_any_forward(chat_parts) -> None:
    target, _, tokenizer = chat_parts
    engine = Engine(target, NgramDrafter(), tokenizer, prefix_cache_mb=0)
    with pytest.raises(GrammarError, match="my schema cannot be compiled"):
        engine.grammar('start: %json{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}', "my schema")
    with pytest.raises(GrammarError, match="does not start the grammar"):
        engine.grammar('start: "{}"', "x", prefix=tokenizer.encode("[", add_special_tokens=False))
    with pytest.raises(InvalidRequestError, match="constraint must be a Grammar"):
        engine.generate([2, 5], constraint="start: /a/")
    assert engine.counters.steps == 0


# -- sampling -------------------------------------------------------------------------------------

LETTERS = "abcdefghijklm"  # ids 3..15 of a 16-token vocabulary (the small target's)
LETTER_GRAMMAR = 'start: ("a" | "b" | "fgh" | "c" "d"?)+'  # forbids e and i..m; "f" forces "gh" (jump-forward)


def letter_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer of SMALL_VOCAB tokens: three specials and one letter each."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(LETTERS)}}
    assert len(vocab) == SMALL_VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def _masked_probs(grammar: Grammar, prompt_len: int, sampling: SamplingParams):
    """exact_marginals' probs_of: each prefix's logits masked by the grammar after its own tokens."""

    def probs_of(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        bits = allocate_token_bitmask(len(ids), grammar.tokenizer.vocab_size)
        for row, seq in enumerate(ids.tolist()):
            matcher = grammar.matcher()
            assert matcher.consume_tokens(seq[prompt_len:])
            fill_next_token_bitmask(matcher, bits, row)
        allowed = torch.tensor([[bool(b[t // 32] >> (t % 32) & 1) for t in range(SMALL_VOCAB)] for b in bits])
        allowed[:, 1] = False  # the tokenizer's EOS: these requests have no stop tokens
        return process_logits(logits.masked_fill(~allowed, float("-inf")), sampling)

    return probs_of


@pytest.mark.parametrize("drafter,draws", [("mtp", 700), ("ngram", 1500)])
def test_constrained_speculative_sampling_keeps_the_constrained_distribution(small_target, drafter, draws) -> None:
    """mtp drafts from q, often a letter the grammar forbids (kept, rejected, residual drawn);
    n-gram drafts are point masses (cut before a forbidden one). Jump-forward runs after "f"."""
    model, assistant = small_target
    drafters = {"mtp": lambda: MTPDrafter(assistant, TargetModel(model), stop_below=0.0), "ngram": NgramDrafter}
    engine = Engine(model, drafters[drafter](), letter_tokenizer())
    grammar = engine.grammar(LETTER_GRAMMAR)
    sampling = SamplingParams(1.0, 1.0, 0)
    prompt = [2, 8, 9, 10, 3, 8, 9, 10]  # "fgh a fgh": n-gram lookup proposes after it
    n_tokens = 3
    exact = exact_marginals(model, prompt, n_tokens, _masked_probs(grammar, len(prompt), sampling))
    samples: list[list[int]] = [[] for _ in range(n_tokens)]
    drafted = jumped = 0
    for seed in range(draws):
        result = engine.generate(
            prompt, max_new_tokens=n_tokens + 5, temperature=1.0, seed=seed, num_draft_tokens=3, stop_token_ids=[], constraint=grammar
        )
        drafted += result.stats.drafted
        jumped += result.stats.jump_forward_tokens
        for i in range(n_tokens):
            samples[i].append(result.token_ids[i])
    assert drafted >= draws and jumped > 0
    for i in range(n_tokens):
        assert exact[i][[0, 1, 2, 7, *range(11, SMALL_VOCAB)]].sum() == 0  # e and i..m are forbidden
        assert _chi2_ok(samples[i], exact[i].float()) > P_MIN, f"token {i + 1} off the constrained distribution"
