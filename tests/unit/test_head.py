"""The fast vocabulary projections: same values as transformers' own head, the greedy pick equal to
`argmax`, and the MTP drafter's centroid head drafting exactly what the assistant's own forward would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_assistant, build_target

from langchain_gemma_mtp.distill.objective import draft_argmax
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import DraftRequest, DraftStep
from langchain_gemma_mtp.engine.head import centroid_candidates, project
from langchain_gemma_mtp.engine.types import SamplingParams
from langchain_gemma_mtp.engine.verify import greedy_ids


@pytest.mark.parametrize("shape", [(640,), (1, 640), (2, 640), (5, 640), (1, 3, 640), (17, 640)])
def test_project_equals_linear_in_float32(shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4099, 640, generator=g)
    hidden = torch.randn(*shape, generator=g)
    out = project(hidden, weight)
    assert out.shape == F.linear(hidden, weight).shape
    torch.testing.assert_close(out, F.linear(hidden, weight), rtol=1e-5, atol=1e-4)
    # Same greedy choice per row as the reference product.
    assert torch.equal(out.argmax(-1), F.linear(hidden, weight).argmax(-1))


def test_project_keeps_linear_for_other_dtypes():
    weight = torch.randn(300, 64, dtype=torch.bfloat16)
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(project(hidden, weight), F.linear(hidden, weight))


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
