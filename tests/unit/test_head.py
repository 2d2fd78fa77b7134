"""The vocabulary projections: the target's logits equal to transformers' own, the greedy pick equal
to `argmax` (whole or a slice of the vocabulary at a time), and the MTP drafter's centroid head
drafting exactly what the assistant's own forward would."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from test_engine_greedy import NEW_TOKENS, PROMPT_SEEDS, hf_greedy, prompt
from test_engine_worker import output_of_a_clean_exit
from tiny_models import build_assistant, build_target

from langchain_gemma_mtp.distill.objective import draft_argmax
from langchain_gemma_mtp.engine import Engine, head, matmul, memory
from langchain_gemma_mtp.engine.drafters import DraftRequest, DraftStep, NgramDrafter
from langchain_gemma_mtp.engine.head import centroid_candidates, greedy_ids, greedy_rows
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.types import SamplingParams


@torch.inference_mode()
def test_a_targets_logits_are_its_models_own(checkpoints):
    """The engine runs the head and softcap itself, on the rows it needs: the values transformers' forward gives."""
    engine = Engine.from_pretrained(checkpoints["shared_ple"], drafter="none")
    ids = torch.tensor([list(range(3, 20))])
    expected = engine.model(input_ids=ids).logits[0]
    fwd = engine.target.forward(ids[0].tolist(), engine.target.new_cache(), prefill=False)
    torch.testing.assert_close(engine.target.logits(fwd.hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ids_pick_argmax_first_index_on_ties(dtype):
    """The engine's greedy choice is `argmax`'s, ties included: bf16 logits tie often (8-bit mantissa)."""
    g = torch.Generator().manual_seed(3)
    for rows, width in ((1, 262144), (6, 262144), (3, 50)):
        logits = torch.randint(-4, 5, (rows, width), generator=g).to(dtype)  # many ties for the top value
        assert torch.equal(greedy_ids(logits), logits.argmax(-1))
        top = logits.max(-1).values
        first = [int((row == v).nonzero()[0]) for row, v in zip(logits, top)]
        assert greedy_ids(logits).tolist() == first
        smooth = torch.randn(rows, width, generator=g).to(dtype)
        assert torch.equal(greedy_ids(smooth), smooth.argmax(-1))
    assert greedy_ids(torch.tensor([1.0, 3.0, 3.0])).item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_greedy_choice_slice_by_slice_is_argmax_ties_included(monkeypatch, dtype):
    """Many rows take their argmax a slice of the vocabulary at a time; a top value tied across
    slices keeps its first index, as `argmax` does. Few rows compute the logits whole."""
    g = torch.Generator().manual_seed(5)
    # Small integers: every product is exact in both dtypes, and the top value ties often.
    weight = torch.randint(-3, 4, (1000, 16), generator=g).to(dtype)
    calls: list[slice] = []

    def logits(hidden: torch.Tensor):
        def of(columns: slice) -> torch.Tensor:
            calls.append(columns)
            return F.linear(hidden, weight[columns])

        return of

    monkeypatch.setattr(head, "ARGMAX_SLICE", 97)  # slices of uneven width: ties fall across their edges
    many = torch.randint(-2, 3, (head.SLICED_ARGMAX_ROWS + 12, 16), generator=g).to(dtype)
    full = F.linear(many, weight)
    got = greedy_rows(logits(many), len(many), len(weight), torch.device("cpu"))
    assert torch.equal(got, full.argmax(-1)) and len(calls) == -(-1000 // 97)
    slice_of = lambda column: column // 97  # noqa: E731
    tied_across = [
        row for row, top in zip(full, full.max(-1).values) if len({slice_of(int(c)) for c in (row == top).nonzero().flatten()}) > 1
    ]
    assert len(tied_across) >= 5  # the case the strict comparison is for did occur
    calls.clear()
    few = many[:5]
    assert torch.equal(greedy_rows(logits(few), 5, len(weight), torch.device("cpu")), F.linear(few, weight).argmax(-1))
    assert calls == [slice(None)]


@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
@torch.inference_mode()
def test_a_targets_greedy_choice_is_the_argmax_of_its_softcapped_logits(monkeypatch, kind):
    target = TargetModel(build_target(kind))
    monkeypatch.setattr(head, "ARGMAX_SLICE", 100)
    hidden = torch.randn(head.SLICED_ARGMAX_ROWS, target.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(6))
    assert torch.equal(target.greedy(hidden), target.logits(hidden).argmax(-1))


def _step(engine: Engine, ids: list[int], sampling: SamplingParams, k: int, generator=None) -> DraftStep:
    target = engine.target
    cache = target.new_cache()
    fwd = target.forward(ids[:-1], cache, prefill=True)
    kv = target.rollback(cache, fwd, 0)
    request = DraftRequest(len(ids), sampling, generator)
    return DraftStep(request, list(ids), k, k, hidden=fwd.hidden[-1:][None], shared_kv=kv)


@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
@pytest.mark.parametrize("assistant", ["assistant", "plain-assistant"])
@torch.inference_mode()
def test_mtp_drafts_equal_the_assistants_own_forward(checkpoints, kind, assistant):
    """Our drafter skips transformers' vocabulary-sized centroid output; the drafts must not change."""
    path = checkpoints[kind]
    engine = Engine.from_pretrained(path, drafter="mtp", assistant=path.parent / f"{kind}-{assistant}")
    drafter, a = engine.drafter, engine.drafter.assistant
    ids = torch.randint(3, engine.target.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    step = _step(engine, ids, SamplingParams(), 4)
    stopped = drafter.propose(step).tokens  # the default early stop: a prefix of the full draft
    drafter.stop_below = 0.0
    draft = drafter.propose(step)
    drafts, probs = draft.tokens, draft.probs
    assert probs is None and len(drafts) == 4
    # The same steps through the stock forward (its head, its masks), greedy over its logits.
    token, h = torch.tensor([[ids[-1]]]), step.hidden
    expected = []
    for _ in range(4):
        out = a(
            inputs_embeds=torch.cat([engine.target.embed(token), h], dim=-1),
            position_ids=torch.tensor([[len(ids) - 1]]),
            shared_kv_states=step.shared_kv,
        )
        token, h = out.logits[0, -1].argmax().view(1, 1), out.last_hidden_state
        expected.append(int(token))
    assert drafts == expected
    assert 1 <= len(stopped) and stopped == expected[: len(stopped)]


@torch.inference_mode()
def test_sampled_centroid_drafts_put_mass_only_on_scored_tokens(checkpoints):
    path = checkpoints["shared_ple"]
    engine = Engine.from_pretrained(path, drafter="mtp")
    embedder = engine.drafter.assistant.masked_embedding
    assert embedder is not None
    ids = list(range(3, 20))
    step = _step(engine, ids, SamplingParams(temperature=1.0), 3, torch.Generator().manual_seed(0))
    engine.drafter.stop_below = 0.0  # three drafts, whatever their probabilities
    draft = engine.drafter.propose(step)
    drafts, probs = draft.tokens, draft.probs
    assert probs.shape == (3, engine.target.vocab_size)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    scored = embedder.centroid_intermediate_top_k * (embedder.vocab_size // embedder.num_centroids)
    assert all(int((row > 0).sum()) <= scored for row in probs)
    assert all(probs[i, t] > 0 for i, t in enumerate(drafts))


def test_heldout_estimate_drafts_like_inference():
    """distill's held-out estimate scores (state, cluster) pairs cluster by cluster; its drafts must
    be the ones the MTP drafter's centroid head picks, state by state."""
    target = build_target("shared_ple")
    assistant = build_assistant(target, ordered=True)
    embedder, weight = assistant.masked_embedding, assistant.lm_head.weight.detach()
    states = torch.randn(200, weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = draft_argmax(assistant, states, weight)
        one_by_one = [int(ids[logits.argmax()]) for ids, logits in (centroid_candidates(embedder, s, weight) for s in states)]
    assert batched.tolist() == one_by_one


# -- the fp16 screen of the greedy head (head.ScreenedHead) -----------------------------------------


def screened_case(seed: int, rows: int = 40, vocab: int = 3000, width: int = 96):
    """A float32 head with exact duplicates (ties: the first index wins) and near-duplicates (float32
    tells them apart, fp16 cannot), and hidden rows with outliers, aimed at those tokens."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, width, generator=g) * 0.05
    weight[7] = weight[2900]  # an exact tie, the lower index first
    weight[11] = weight[1500] * (1 + 3e-4)  # a near tie the fp16 copy rounds away
    weight[12] = weight[1501] * (1 - 3e-4)
    hidden = torch.randn(rows, width, generator=g) * 3
    hidden[:, 5] *= 20  # an outlier channel, as real hidden states have
    for i, token in enumerate((2900, 1500, 1501, 11)):  # rows that want the tied tokens
        hidden[i] = weight[token] / weight[token].norm() * 80 + torch.randn(width, generator=g) * 0.01
    return weight, hidden


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fp16_screen_picks_the_float32_greedy_token_ties_and_near_ties_included(seed, softcap):
    weight, hidden = screened_case(seed)
    screen = head.ScreenedHead(weight, softcap)
    logits = (hidden.double()[:, None] * weight.double()[None]).sum(-1)  # the real values: ties stay ties
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ids = screen.greedy(hidden)
    assert ids is not None and torch.equal(ids, greedy_ids(logits))
    assert int(ids[0]) == 7  # the exact tie: the first index
    assert screen.rescored > 0  # some rows were too close to call from fp16 and were scored in float32


def test_the_screens_bound_holds_for_every_token():
    """The slack is a proof, not a fit: |fp16 logit - float32 logit| never exceeds |x| slack + floor,
    for hidden rows with outliers and entries below fp16's normal range."""
    for seed in range(3):
        weight, hidden = screened_case(seed)
        hidden[-1, :10] = 3e-6  # fp16 subnormals, if fbgemm rounds x to fp16
        screen = head.ScreenedHead(weight)
        approx = torch.ops.quantized.linear_dynamic_fp16(hidden, screen.packed).double()
        exact = hidden.double() @ weight.double().T
        bound = hidden.double().norm(dim=-1, keepdim=True) * screen.slack + screen.floor
        assert ((approx - exact).abs() <= bound).all()
        assert ((approx - exact).abs() > bound / 50).any()  # and not so loose that it proves nothing


def test_the_screen_declines_rows_it_cannot_prove():
    weight, hidden = screened_case(0)
    screen = head.ScreenedHead(weight, softcap=5.0)
    assert screen.greedy(hidden) is None  # logits past twice the softcap: tanh ties them in float32
    nan = hidden.clone()
    nan[3, 0] = float("nan")
    assert head.ScreenedHead(weight).greedy(nan) is None


def test_the_screen_is_for_float32_cpu_heads_without_bias():
    weight = torch.randn(50, 8)
    assert head.ScreenedHead.applies(weight, None)
    assert not head.ScreenedHead.applies(weight, torch.zeros(50))
    assert not head.ScreenedHead.applies(weight.bfloat16(), None)
    assert not head.ScreenedHead.applies(weight * 1e5, None)  # past fp16's range


def screened_calls(monkeypatch) -> list[int]:
    """The rows of every `ScreenedHead.greedy` call from now on."""
    calls: list[int] = []
    screen = head.ScreenedHead.greedy
    monkeypatch.setattr(head.ScreenedHead, "greedy", lambda self, hidden: (calls.append(len(hidden)), screen(self, hidden))[1])
    return calls


@pytest.mark.parametrize("form", ["full", "screened"])
@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])  # with the final softcap, and without
def test_greedy_output_is_transformers_with_either_greedy_form(checkpoints, kind, form, monkeypatch):
    """float32: the engine's speculative greedy output equals transformers' greedy output whether
    the target's greedy tokens come from its logits or through the fp16 screen."""
    calls = screened_calls(monkeypatch)
    engine = Engine.from_pretrained(checkpoints[kind])
    engine.target._greedy.fixed = form
    for seed in PROMPT_SEEDS:
        expected = hf_greedy(engine.model, prompt(seed), NEW_TOKENS)
        for k in (1, 4):
            got = engine.generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
            assert got.token_ids == expected, f"{kind}/{form}/k={k}/prompt {seed}"
    assert bool(calls) == (form == "screened")


def test_loading_packs_the_screen_on_a_thread_of_its_own_and_the_first_forward_waits_for_it(checkpoints, monkeypatch):
    events: list[tuple[str, str]] = []
    build, packed = head.ScreenedHead.__init__, threading.Event()

    def slow_build(self, *args):
        packed.wait(30)  # a real head takes seconds: loading must not wait for it
        build(self, *args)
        events.append(("built", threading.current_thread().name))

    monkeypatch.setattr(head.ScreenedHead, "__init__", slow_build)
    engine = Engine.from_pretrained(checkpoints["gemma3"])
    assert not events and engine.target._packing is not None and engine.target._packing.is_alive()
    engine.target.decoder.register_forward_pre_hook(lambda *a: events.append(("forward", threading.current_thread().name)))
    threading.Timer(0.3, packed.set).start()  # the pack ends while the request would already run
    got = engine.generate(prompt(0), max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[])
    assert got.token_ids == hf_greedy(engine.model, prompt(0), NEW_TOKENS)
    assert events[0] == ("built", "gemma-mtp-screen") and events[1][0] == "forward"
    assert engine.target._screen is not None and engine.target._packing is None


def test_the_default_kv_budget_counts_the_screens_copy_while_it_packs(checkpoints, monkeypatch):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 8 * 2**30)
    build, packed = head.ScreenedHead.__init__, threading.Event()
    monkeypatch.setattr(head.ScreenedHead, "__init__", lambda self, *args: (packed.wait(30), build(self, *args))[1])
    try:
        engine = Engine.from_pretrained(checkpoints["gemma3"], prefix_cache_mb=64)
        copy = engine.target.lm_head.weight.numel() * 2  # fp16
        assert engine.target.packing_bytes == copy
        assert engine.kv_budget.limit_bytes == int(((8 * 2**30 - copy) / 2 / 2**20 - 64) * 2**20)
    finally:
        packed.set()
    engine.generate(prompt(0), max_new_tokens=4, stop_token_ids=[])
    assert engine.target.packing_bytes == 0  # packed: what it took is in the free memory read from now on


EXIT_WHILE_PACKING = """
import sys, torch
from langchain_gemma_mtp.engine import Engine, head
build = head.ScreenedHead.__init__
def slow_build(self, *args):  # a real head's pack: seconds inside fbgemm, not Python
    torch.ops.quantized.linear_prepack_fp16(torch.randn(131072, 640), None)
    build(self, *args)
head.ScreenedHead.__init__ = slow_build
engine = Engine.from_pretrained(sys.argv[1])
print(engine.target._packing.is_alive(), flush=True)
"""


def test_the_interpreter_exits_cleanly_while_the_screen_is_packing(checkpoints):
    # A script that loads and ends at once: a thread still inside torch at exit aborts the process.
    assert output_of_a_clean_exit(EXIT_WHILE_PACKING, str(checkpoints["gemma3"])).split() == ["True"]


def test_a_screen_that_cannot_be_built_leaves_a_warning_and_the_logits(checkpoints, monkeypatch, caplog):
    def no_room(self, *args):
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(head.ScreenedHead, "__init__", no_room)
    engine = Engine.from_pretrained(checkpoints["gemma3"])
    for seed in PROMPT_SEEDS:
        got = engine.generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[])
        assert got.token_ids == hf_greedy(engine.model, prompt(seed), NEW_TOKENS)
    assert engine.target._screen is None and "the fp16 greedy screen was not built" in caplog.text
    chooser = engine.target._greedy  # the forms it timed or chose: the logits alone
    assert {*chooser.chosen.values(), *(form for times in chooser._times.values() for form in times)} == {"full"}
    caplog.clear()
    by_hand = Engine(engine.model, NgramDrafter(), engine.tokenizer)  # nothing packed at load: built at its first trial
    for seed in PROMPT_SEEDS:
        got = by_hand.generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[])
        assert got.token_ids == hf_greedy(engine.model, prompt(seed), NEW_TOKENS)
    assert by_hand.target._screen is None and "the fp16 greedy screen was not built" in caplog.text


def test_the_target_measures_both_greedy_forms_and_fixes_full_with_the_matmul_form(checkpoints, monkeypatch):
    engine = Engine.from_pretrained(checkpoints["gemma3"])
    for seed in PROMPT_SEEDS:
        engine.generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=1, stop_token_ids=[])
    assert engine.target._screen is not None  # tried beside the logits
    monkeypatch.setattr(matmul.CHOOSER, "fixed", "linear")  # bit-reproducible runs: logits, no screen
    fixed = Engine.from_pretrained(checkpoints["gemma3"]).target
    assert fixed._greedy.fixed == "full" and fixed._packing is None and fixed._screen is None  # no copy packed
