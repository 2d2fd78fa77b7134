"""`gemma-mtp distill` on tiny Gemma 4 and Gemma 3 targets: resumable training, held-out acceptance, lossless drafts.

The targets are tiny random models with the fixture tokenizer; the drafters learn their greedy
continuations of one set of prompts and are measured on prompts of other words.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import build_target, save
from transformers import AutoTokenizer

from langchain_gemma_mtp import cli
from langchain_gemma_mtp.distill import (
    DistillOptions,
    assistant_config,
    balanced_clusters,
    build_assistant,
    distill,
    save_assistant,
)
from langchain_gemma_mtp.distill.data import generated_sequences
from langchain_gemma_mtp.distill.objective import (
    captured_queries,
    teacher_batch,
    unrolled_states,
)
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import MTPDrafter
from langchain_gemma_mtp.engine.loading import kv_source_layer, load_causal_lm
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.errors import (
    DistillError,
    IncompatibleDrafterError,
    ModelNotFoundError,
)
from langchain_gemma_mtp.testing import TOKENIZER_DIR

TOKENIZER = TOKENIZER_DIR
WORDS = ["red", "blue", "green", "small", "large", "old", "new", "quiet", "loud", "bright", "dark", "warm"]
NOUNS = ["house", "river", "garden", "engine", "letter", "window", "bridge", "market", "forest", "kettle"]
HELD_WORDS = ["amber", "silver", "narrow", "hollow"]
HELD_NOUNS = ["tower", "harbor", "meadow", "lantern"]
# Draft settings per target kind: the Gemma 4 drafter uses a centroid head, the Gemma 3 one the full vocabulary.
KINDS = {"shared_ple": ["--centroids", "64", "--centroid-top-k", "8"], "gemma3": []}


def _prompts(words, nouns, n, seed):
    rng = random.Random(seed)
    return [f"Describe the {rng.choice(words)} {rng.choice(nouns)} and the {rng.choice(words)} {rng.choice(nouns)}." for _ in range(n)]


@pytest.fixture(scope="session")
def distill_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    targets = {}
    for kind in KINDS:
        path = save(build_target(kind, vocab=len(tokenizer)), root / kind)
        tokenizer.save_pretrained(path)
        targets[kind] = path
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(WORDS, NOUNS, 24, 0)))
    held = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in _prompts(HELD_WORDS, HELD_NOUNS, 4, 1)
    ]
    return root, targets, prompts, held


def _args(target, out, prompts, steps, *extra):
    return [
        "distill",
        "--target",
        str(target),
        "--out",
        str(out),
        "--prompts",
        str(prompts),
        "--seq-len",
        "64",
        "--steps",
        str(steps),
        "--lr",
        "3e-3",
        "--heldout",
        "0.25",
        "--eval-every",
        "15",
        "--save-every",
        "8",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="session")
def distilled(distill_setup):
    """Per target kind, a drafter distilled through the CLI in two runs (16 steps, then resumed to 30)."""
    root, targets, prompts, _ = distill_setup
    out = {}
    for kind, extra in KINDS.items():
        out[kind] = root / f"{kind}-drafter"
        assert cli.main(_args(targets[kind], out[kind], prompts, 16, *extra)) == 0
        assert json.loads((out[kind] / "distill.json").read_text())["steps"] == 16
        assert cli.main(_args(targets[kind], out[kind], prompts, 30, *extra, "--resume")) == 0
    return out


def test_resumed_run_equals_an_uninterrupted_one(distill_setup, distilled):
    root, targets, prompts, _ = distill_setup
    straight = root / "straight"
    assert cli.main(_args(targets["shared_ple"], straight, prompts, 30, *KINDS["shared_ple"])) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(distilled["shared_ple"] / "model.safetensors")
    assert a.keys() == b.keys()
    assert "lm_head.weight" not in a and "model.embed_tokens.weight" not in a  # the target's head is not stored
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((distilled["shared_ple"] / "distill.json").read_text())
    assert summary["steps"] == 30 and len(summary["heldout_acceptance"]) == 4


@pytest.mark.parametrize("kind", list(KINDS))
def test_distilled_drafter_beats_untrained_on_heldout_sequences_and_stays_lossless(kind, distill_setup, distilled, tmp_path):
    """Measured by the engine on the prompts of the run's held-out sequences (a quarter, never trained on).

    The tiny targets are random models: their continuations of new prompts are arbitrary, so only
    some held-out prompts are learnable at all; the bar is a clear margin over an untrained drafter.
    """
    _, targets, _, _ = distill_setup
    held = [ids[:start] for ids, start in torch.load(distilled[kind] / "distill-data.pt")[:6]]
    model, _ = load_causal_lm(targets[kind], torch.device("cpu"), torch.float32)
    target = TargetModel(model)
    config = assistant_config(
        target, layers=2, hidden=None, intermediate=None, centroids=64 if kind == "shared_ple" else 0, centroid_top_k=8
    )
    save_assistant(build_assistant(target, config, seed=0), tmp_path / "untrained")
    trained = Engine.from_pretrained(targets[kind], drafter="mtp", assistant=distilled[kind], dtype="float32")
    untrained = Engine.from_pretrained(targets[kind], drafter="mtp", assistant=tmp_path / "untrained", dtype="float32")
    plain = Engine(trained.model)
    rates = {"trained": [], "untrained": []}
    for ids in held:
        expected = plain.generate(ids, max_new_tokens=40).token_ids
        for name, engine in (("trained", trained), ("untrained", untrained)):
            result = engine.generate(ids, max_new_tokens=40, num_draft_tokens=4)
            assert result.token_ids == expected  # fp32 greedy: speculative output is the target's own
            rates[name].append(result.stats.acceptance_rate)
    trained_rate, untrained_rate = (sum(r) / len(r) for r in rates.values())
    assert trained_rate > untrained_rate + 0.3, rates


def test_reloaded_drafter_drafts_like_the_trained_one(distill_setup, tmp_path):
    _, targets, prompts, held = distill_setup
    options = DistillOptions(
        target=str(targets["shared_ple"]),
        out=str(tmp_path / "d"),
        prompts=[str(prompts)],
        seq_len=64,
        steps=10,
        lr=3e-3,
        centroids=64,
        centroid_top_k=8,
        progress=False,
    )
    result = distill(options)
    # The target stays frozen: its shared embedding/head gets no vocabulary-sized gradient.
    head = result.assistant.lm_head.weight
    assert not head.requires_grad and head.grad is None
    model, _ = load_causal_lm(targets["shared_ple"], torch.device("cpu"), torch.float32)
    in_memory = Engine(model, MTPDrafter(result.assistant, TargetModel(model)))
    reloaded = Engine.from_pretrained(targets["shared_ple"], drafter="mtp", assistant=result.out, dtype="float32")
    for ids in held[:2]:
        a = in_memory.generate(ids, max_new_tokens=30, num_draft_tokens=3)
        b = reloaded.generate(ids, max_new_tokens=30, num_draft_tokens=3)
        assert a.token_ids == b.token_ids
        assert a.stats.accepted_at == b.stats.accepted_at and a.stats.draft_lengths == b.stats.draft_lengths


def test_balanced_clusters_partition_the_vocabulary():
    rows = torch.randn(512, 16)
    ordering, centers = balanced_clusters(rows, 32, seed=0)
    assert sorted(ordering.tolist()) == list(range(512))
    assert centers.shape == (32, 16)
    assert torch.allclose(centers[3], rows[ordering.view(32, 16)[3]].mean(0))


@pytest.mark.parametrize("kind", list(KINDS))
def test_fresh_drafter_queries_meet_target_keys_at_the_targets_attention_scale(kind, distill_setup):
    """Gemma 3 K are trained for a 1/sqrt(query_pre_attn_scalar) scale, Gemma 4 attention scales by 1:
    a fresh drafter's query norm starts at the ratio, so its attention logits start in the target's range."""
    _, targets, _, _ = distill_setup
    model, _ = load_causal_lm(str(targets[kind]), torch.device("cpu"), torch.float32)
    target = TargetModel(model)
    config = assistant_config(target, layers=2, hidden=None, intermediate=None, centroids=0, centroid_top_k=8)
    assistant = build_assistant(target, config)
    for layer, layer_type in zip(assistant.model.layers, config.get_text_config().layer_types):
        theirs = target.decoder.layers[kv_source_layer(target, layer_type)].self_attn.scaling
        ours = layer.self_attn.q_norm.weight * layer.self_attn.scaling
        assert torch.allclose(ours, torch.full_like(ours, theirs))
    if kind == "gemma3":  # the case the rule is for: the two attentions scale differently
        assert theirs != pytest.approx(layer.self_attn.scaling)


@pytest.mark.parametrize(
    "extra, error, says",
    [
        (["--centroids", "5000"], DistillError, "must divide"),
        (["--centroids", "3"], DistillError, "must divide"),
        (["--centroids", "64", "--centroid-top-k", "65"], DistillError, "--centroid-top-k"),
        (["--draft-steps", "0"], DistillError, "--draft-steps"),
        (["--heldout", "1.5"], DistillError, "--heldout"),
        (["--data", "no-such-file.txt"], DistillError, "does not exist"),
        (["--resume"], DistillError, "--resume"),
    ],
)
def test_bad_distill_options_fail_before_any_work(extra, error, says, distill_setup, tmp_path):
    _, targets, prompts, _ = distill_setup
    out = tmp_path / "never"
    with pytest.raises(error, match=says):
        cli.main(_args(targets["gemma3"], out, prompts, 5, *extra))
    assert not out.exists()


def test_distill_needs_a_target_and_text(distill_setup, tmp_path):
    _, targets, prompts, _ = distill_setup
    with pytest.raises(ModelNotFoundError):
        cli.main(_args(tmp_path / "missing-model", tmp_path / "o", prompts, 5))
    with pytest.raises(DistillError, match="no training text"):
        cli.main(["distill", "--target", str(targets["gemma3"]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # argparse: --target is required
        cli.main(["distill", "--out", str(tmp_path / "o")])


def test_resume_with_changed_options_is_refused(distill_setup, distilled):
    _, targets, prompts, _ = distill_setup
    with pytest.raises(DistillError, match="layers"):
        cli.main(_args(targets["gemma3"], distilled["gemma3"], prompts, 40, "--layers", "3", "--resume"))


def test_init_continues_from_the_given_drafter_in_its_shape(distill_setup, distilled, tmp_path):
    """--init starts from the drafter's weights and shape: one step at a negligible rate leaves them
    where they were, while a fresh drafter of the same shape starts elsewhere."""
    _, targets, prompts, _ = distill_setup
    start = distilled["gemma3"]
    assert cli.main(_args(targets["gemma3"], tmp_path / "init", prompts, 1, "--init", str(start), "--lr", "1e-12")) == 0
    assert cli.main(_args(targets["gemma3"], tmp_path / "fresh", prompts, 1, "--lr", "1e-12")) == 0
    before, after, fresh = (load_file(d / "model.safetensors") for d in (start, tmp_path / "init", tmp_path / "fresh"))
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
    assert not all(torch.allclose(fresh[k], before[k], atol=1e-6) for k in before)
    options = json.loads((tmp_path / "init" / "distill.json").read_text())["options"]
    assert options["init"] == str(start) and options["layers"] == 2 and options["centroids"] == 0


def test_bad_init_fails_before_any_work(distill_setup, distilled, tmp_path):
    _, targets, prompts, _ = distill_setup
    out = tmp_path / "never"
    with pytest.raises(DistillError, match="not a Gemma 4 MTP assistant"):
        cli.main(_args(targets["gemma3"], out, prompts, 5, "--init", str(targets["gemma3"])))
    with pytest.raises(DistillError, match=r"--layers 3 \(it has 2\)"):
        cli.main(_args(targets["gemma3"], out, prompts, 5, "--init", str(distilled["gemma3"]), "--layers", "3"))
    with pytest.raises(DistillError, match="cannot start a drafter"):
        cli.main(_args(targets["shared_ple"], out, prompts, 5, "--init", str(distilled["gemma3"])))
    assert not out.exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_query_weight_teaches_the_drafter_the_targets_queries(kind, distill_setup, tmp_path):
    """With --query-weight the drafter's queries for a token turn toward the target's own queries
    for it, in the layer whose K/V each drafter layer reads; without it they do not."""
    _, targets, prompts, held = distill_setup
    model, _ = load_causal_lm(str(targets[kind]), torch.device("cpu"), torch.float32)
    target = TargetModel(model)

    def similarity(weight: float) -> float:
        options = DistillOptions(
            target=str(targets[kind]),
            out=str(tmp_path / str(weight)),
            prompts=[str(prompts)],
            seq_len=64,
            steps=25,
            lr=3e-3,
            query_weight=weight,
            progress=False,
        )
        assistant = distill(options).assistant
        types = assistant.config.get_text_config().layer_types
        sims = []
        for ids in held:
            batch = teacher_batch(target, ids, 0, None, sorted(set(types)))
            with torch.no_grad(), captured_queries({t: layer.self_attn for t, layer in zip(types, assistant.model.layers)}) as got:
                next(unrolled_states(assistant, target, batch, 1))
            sims += [F.cosine_similarity(got[t][0][0, 1:], batch.queries[t][1:].float(), dim=-1).mean().item() for t in types]
        return sum(sims) / len(sims)

    without, with_queries = similarity(0.0), similarity(1.0)
    assert with_queries > without + 0.2, (without, with_queries)


def test_chat_model_loads_a_distilled_drafter(distill_setup, distilled):
    from langchain_gemma_mtp import ChatGemmaMTP

    _, targets, _, _ = distill_setup
    llm = ChatGemmaMTP(
        model=str(targets["gemma3"]), assistant_model=str(distilled["gemma3"]), dtype="float32", max_tokens=12, num_draft_tokens=3
    )
    message = llm.invoke("Describe the red house.")
    assert message.response_metadata["speculative"]["drafter"] == "hybrid"  # auto: the distilled assistant, with long n-gram matches copied


def test_long_prompts_keep_their_first_token(distill_setup):
    """A prompt longer than half of --seq-len is cut from the front, but its BOS stays."""
    _, targets, _, held = distill_setup
    model, tokenizer = load_causal_lm(targets["shared_ple"], torch.device("cpu"), torch.float32)
    long_prompt = held[0] + held[1][1:] + held[2][1:]
    assert long_prompt[0] == tokenizer.bos_token_id and len(long_prompt) > 32
    ((seq, start),) = generated_sequences(model, tokenizer, [long_prompt], seq_len=64, budget=1000)
    assert seq[0] == tokenizer.bos_token_id
    assert start == 32 and seq[1:start] == long_prompt[-31:]


def test_a_drafter_can_read_another_target_layer_and_stays_lossless(distill_setup, tmp_path):
    """--kv-layer full_attention=1: the drafter's full-attention layer reads the tiny Gemma 3's layer 1
    instead of its last full layer (3); the choice is saved with the drafter, a resume keeps it, and
    the engine hands the drafter that layer's K/V, with output equal to plain greedy."""
    _, targets, prompts, held = distill_setup
    extra = ("--kv-layer", "full_attention=1")
    assert cli.main(_args(targets["gemma3"], tmp_path / "straight", prompts, 6, *extra)) == 0
    assert cli.main(_args(targets["gemma3"], tmp_path / "resumed", prompts, 3, *extra)) == 0
    assert cli.main(_args(targets["gemma3"], tmp_path / "resumed", prompts, 6, *extra, "--resume")) == 0
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["target_kv_layers"] == {"full_attention": 1}
    with pytest.raises(DistillError, match="kv_layers"):
        cli.main(_args(targets["gemma3"], tmp_path / "resumed", prompts, 8, "--resume"))
    # --init re-points a drafter's layers.
    assert (
        cli.main(
            _args(targets["gemma3"], tmp_path / "moved", prompts, 1, "--init", str(tmp_path / "straight"), "--kv-layer", "full_attention=3")
        )
        == 0
    )
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["target_kv_layers"] == {"full_attention": 3}

    engine = Engine.from_pretrained(targets["gemma3"], drafter="mtp", assistant=tmp_path / "straight", dtype="float32")
    target = engine.drafter.target
    assert target.kv_layers == {"sliding_attention": 2, "full_attention": 1}
    cache = target.new_cache()
    kv = target.rollback(cache, target.forward(held[0], cache), 0)
    assert torch.equal(kv["full_attention"][0], cache.layers[1].keys)
    # A drafter built around the in-memory assistant points its target the same way.
    assert MTPDrafter(engine.drafter.assistant, TargetModel(engine.model)).target.kv_layers["full_attention"] == 1
    plain = Engine(engine.model)
    for ids in held:
        assert engine.generate(ids, max_new_tokens=30, num_draft_tokens=3).token_ids == plain.generate(ids, max_new_tokens=30).token_ids


@pytest.mark.parametrize(
    "kind, extra, says",
    [
        ("gemma3", ["--kv-layer", "full_attention=0"], "target layer 0 is sliding_attention, not full_attention"),
        ("gemma3", ["--kv-layer", "full_attention=9"], "not one of the target's 0..3"),
        ("gemma3", ["--kv-layer", "global=1"], "unknown layer type 'global'"),
        ("shared_ple", ["--kv-layer", "full_attention=1"], "hands over its own shared K/V"),
    ],
)
def test_bad_kv_layer_options_fail_before_any_work(kind, extra, says, distill_setup, tmp_path):
    _, targets, prompts, _ = distill_setup
    out = tmp_path / "never"
    with pytest.raises(DistillError, match=says):
        cli.main(_args(targets[kind], out, prompts, 5, *extra, *KINDS[kind]))
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: not TYPE=INDEX
        cli.main(_args(targets[kind], out, prompts, 5, "--kv-layer", "full_attention"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_drafter_naming_target_layers_it_cannot_read_is_refused(kind, distill_setup, tmp_path):
    """The layer choice in a checkpoint's config is checked when the pair loads, like its geometry."""
    _, targets, _, _ = distill_setup
    model, _ = load_causal_lm(str(targets[kind]), torch.device("cpu"), torch.float32)
    config = assistant_config(TargetModel(model), layers=2, hidden=None, intermediate=None, centroids=0, centroid_top_k=8)
    config.target_kv_layers = {"full_attention": 0}
    save_assistant(build_assistant(TargetModel(model), config), tmp_path / "a")
    says = "target layer 0 is sliding_attention" if kind == "gemma3" else "hands over its own shared K/V"
    with pytest.raises(IncompatibleDrafterError, match=says):
        Engine.from_pretrained(targets[kind], drafter="mtp", assistant=tmp_path / "a", dtype="float32")


def test_runs_saved_before_an_option_existed_still_resume(distill_setup, tmp_path):
    """A state file without a newer option's key (kv_layers, a dict) resumes as if it had the default."""
    _, targets, prompts, _ = distill_setup
    out = tmp_path / "old"
    assert cli.main(_args(targets["gemma3"], out, prompts, 2)) == 0
    state = torch.load(out / "distill-state.pt", weights_only=False)
    del state["options"]["kv_layers"]
    torch.save(state, out / "distill-state.pt")
    assert cli.main(_args(targets["gemma3"], out, prompts, 3, "--resume")) == 0
    assert json.loads((out / "distill.json").read_text())["steps"] == 3
