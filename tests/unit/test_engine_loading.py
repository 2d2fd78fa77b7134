"""Loading through Engine.from_pretrained: drafter pairing, validation errors, offline failures."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_models import build_assistant, build_target, save

from langchain_gemma_mtp import cli
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.errors import (
    IncompatibleDrafterError,
    InvalidRequestError,
    ModelNotFoundError,
)


def test_auto_pairs_with_the_assistant_beside_the_target(checkpoints):
    assert Engine.from_pretrained(checkpoints["noshare"]).drafter.name == "hybrid"
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="mtp").drafter.name == "mtp"
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="ngram").drafter.name == "ngram"
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="none").drafter.name == "none"


def test_auto_falls_back_to_ngram_without_an_assistant(tmp_path):
    path = save(build_target("noshare"), tmp_path / "lonely")
    assert Engine.from_pretrained(path).drafter.name == "ngram"
    for drafter in ("mtp", "hybrid"):
        with pytest.raises(InvalidRequestError, match="assistant="):
            Engine.from_pretrained(path, drafter=drafter)


def test_auto_uses_a_causal_lm_assistant_as_draft_model(checkpoints, tmp_path):
    draft = save(build_target("gemma3", seed=9), tmp_path / "draft")
    engine = Engine.from_pretrained(checkpoints["noshare"], assistant=draft)
    assert engine.drafter.name == "draft_model"


def test_mtp_stop_below_reaches_the_mtp_drafter(checkpoints):
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="mtp").drafter.stop_below is None  # the schedule's
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="mtp", mtp_stop_below=0).drafter.stop_below == 0.0
    hybrid = Engine.from_pretrained(checkpoints["noshare"], mtp_stop_below=0.5).drafter  # auto: hybrid
    assert hybrid.name == "hybrid" and hybrid.mtp.stop_below == 0.5


def test_mtp_siblings_reach_the_mtp_drafter(checkpoints):
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="mtp").drafter.siblings_per_depth is None  # the schedule's
    assert Engine.from_pretrained(checkpoints["noshare"], drafter="mtp", mtp_siblings=0).drafter.siblings_per_depth == 0
    hybrid = Engine.from_pretrained(checkpoints["noshare"], mtp_siblings=5).drafter  # auto: hybrid
    assert hybrid.name == "hybrid" and hybrid.mtp.siblings_per_depth == 5


@pytest.mark.parametrize("value", [-1, 9, 2.0, True])
def test_bad_mtp_siblings_fail_before_loading(tmp_path, value):
    with pytest.raises(InvalidRequestError, match=r"siblings must be an int in \[0, 8\]"):
        Engine.from_pretrained(tmp_path / "missing", drafter="mtp", assistant=tmp_path / "a", mtp_siblings=value)


@pytest.mark.parametrize("value", [1.0, -0.1, "0.3", True])
def test_bad_mtp_stop_below_fails_before_loading(tmp_path, value):
    # The target does not exist: the threshold's error must come first, before any loading.
    with pytest.raises(InvalidRequestError, match=r"stop_below must be a number in \[0, 1\)"):
        Engine.from_pretrained(tmp_path / "missing", drafter="mtp", assistant=tmp_path / "a", mtp_stop_below=value)


def test_mtp_stop_below_without_mtp_drafting_is_refused(checkpoints, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"only applies to MTP drafting.*'ngram'"):
        Engine.from_pretrained(checkpoints["noshare"], drafter="ngram", mtp_stop_below=0.2)
    lonely = save(build_target("noshare"), tmp_path / "lonely")  # auto finds no assistant: n-gram
    with pytest.raises(InvalidRequestError, match="only applies to MTP drafting"):
        Engine.from_pretrained(lonely, mtp_stop_below=0.2)
    with pytest.raises(InvalidRequestError, match="only applies to MTP drafting"):  # the demo's flag reaches the engine
        cli.main(["demo", "--model", str(checkpoints["noshare"]), "--drafter", "ngram", "--mtp-stop-below", "0.2"])
    with pytest.raises(InvalidRequestError, match="mtp_stop_below and mtp_siblings only apply to MTP drafting"):
        Engine.from_pretrained(lonely, mtp_stop_below=0.2, mtp_siblings=1)
    with pytest.raises(InvalidRequestError, match=r"^mtp_siblings only applies to MTP drafting"):
        cli.main(["demo", "--model", str(checkpoints["noshare"]), "--drafter", "ngram", "--mtp-siblings", "1"])


def test_unknown_drafter_name_fails_before_loading(checkpoints):
    with pytest.raises(InvalidRequestError, match="unknown drafter 'eagle'"):
        Engine.from_pretrained(checkpoints["noshare"], drafter="eagle")


def test_dtype_and_device_arguments(checkpoints):
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="none", dtype="bfloat16", device="cpu")
    assert engine.target.dtype == torch.bfloat16 and engine.device.type == "cpu"
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        Engine.from_pretrained(checkpoints["noshare"], dtype="float7")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vocab=256), "vocab size 512 != target's 256"),
        (dict(hidden=32), "backbone_hidden_size 64 != target hidden size 32"),
    ],
)
def test_mtp_pair_validation(tmp_path, change, message):
    assistant = build_assistant(build_target("noshare"), ordered=False)
    target = build_target("noshare", **change)
    save(target, tmp_path / "t")
    save(assistant, tmp_path / "a")
    with pytest.raises(IncompatibleDrafterError, match=message):
        Engine.from_pretrained(tmp_path / "t", drafter="mtp", assistant=tmp_path / "a")


def test_mtp_validation_of_heads_and_rope(tmp_path):
    target = build_target("noshare")
    assistant = build_assistant(target, ordered=False)
    cfg = assistant.config.get_text_config()
    cfg.rope_parameters = {**cfg.rope_parameters, "sliding_attention": {"rope_type": "default", "rope_theta": 5.0}}
    save(target, tmp_path / "t")
    save(assistant, tmp_path / "a")
    with pytest.raises(IncompatibleDrafterError, match="sliding_attention rope parameters"):
        Engine.from_pretrained(tmp_path / "t", drafter="mtp", assistant=tmp_path / "a")


def test_mtp_validation_of_kv_heads(tmp_path):
    from tiny_models import gemma4_text_config
    from transformers import Gemma4ForCausalLM

    config = gemma4_text_config(shared=False, ple=False, num_global_key_value_heads=None)
    config.num_key_value_heads = 2
    target = Gemma4ForCausalLM(gemma4_text_config(shared=False, ple=False))
    wide = Gemma4ForCausalLM(config)
    save(wide, tmp_path / "t")
    save(build_assistant(target, ordered=False), tmp_path / "a")
    with pytest.raises(IncompatibleDrafterError, match="num_key_value_heads 1 != target's 2"):
        Engine.from_pretrained(tmp_path / "t", drafter="mtp", assistant=tmp_path / "a")


def test_draft_model_vocab_mismatch(tmp_path):
    save(build_target("noshare"), tmp_path / "t")
    save(build_target("noshare", vocab=256), tmp_path / "d")
    with pytest.raises(IncompatibleDrafterError, match="draft model vocab size 256"):
        Engine.from_pretrained(tmp_path / "t", drafter="draft_model", assistant=tmp_path / "d")


@pytest.mark.timeout(60)  # a hang (waiting on a network) fails the test instead of the suite
def test_missing_model_offline_fails_fast_and_says_how(monkeypatch, tmp_path):
    # The hub cannot exist here; HF_HUB_OFFLINE is the real switch users set in that situation.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="pass model=DIR, a local directory"):
        Engine.from_pretrained("google/gemma-4-E2B-it")


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        Engine.from_pretrained(str(tmp_path / "nope"))


def test_stop_ids_may_be_a_list(tmp_path):
    target = build_target("noshare")
    target.generation_config.eos_token_id = [1, 106 % 512]
    path = save(target, tmp_path / "t")
    assert Engine.from_pretrained(path, drafter="none").stop_token_ids == frozenset({1, 106})


def test_default_dtype_is_bf16_where_the_cpu_has_it(monkeypatch):
    from langchain_gemma_mtp.engine.loading import DTYPE_ENV, cpu_has_native_bf16, resolve_dtype

    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # an explicit dtype wins
    monkeypatch.setenv(DTYPE_ENV, "bfloat17")
    with pytest.raises(InvalidRequestError, match=r"unknown \$GEMMA_MTP_DTYPE 'bfloat17'"):
        resolve_dtype(None, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["bf16", torch.float16])
def test_half_precision_on_a_cpu_that_emulates_it_warns(monkeypatch, dtype):
    """Asked for explicitly (the default never picks it there), an emulated half-precision dtype
    still loads, with a warning that names the CPU's missing flags and float32 as the fix."""
    import warnings

    from langchain_gemma_mtp.engine import loading
    from langchain_gemma_mtp.errors import EmulatedDtypeWarning

    monkeypatch.setattr(loading, "_cpu_flags", lambda: {"fpu", "avx2", "fma"})
    with pytest.warns(EmulatedDtypeWarning, match=r"emulated on this CPU .*dtype='float32'"):
        assert loading.resolve_dtype(dtype, torch.device("cpu")) in (torch.bfloat16, torch.float16)
    monkeypatch.setattr(loading, "_cpu_flags", lambda: {"avx2", "avx512_bf16", "avx512_fp16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading.resolve_dtype(dtype, torch.device("cpu"))
        loading.resolve_dtype(dtype, torch.device("cuda"))
    monkeypatch.setattr(loading, "_cpu_flags", lambda: {"avx2"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading.resolve_dtype("float32", torch.device("cpu"))
        loading.resolve_dtype(dtype, torch.device("cuda"))


def test_a_loaded_engine_keeps_the_heap_frozen_until_it_is_freed(checkpoints, monkeypatch):
    """Loading freezes what is alive (full collections then skip it); freeing the engine thaws the
    heap, so its model, a reference cycle, is collected rather than kept for good."""
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="none")
    assert gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    model = weakref.ref(engine.model)
    assert len(gc.get_objects()) < frozen  # the collector walks fewer objects than were frozen
    del engine
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert model() is None
    monkeypatch.setenv("GEMMA_MTP_FREEZE_GC", "0")
    kept = Engine.from_pretrained(checkpoints["noshare"], drafter="none")
    assert gc.get_freeze_count() == 0 and kept.model is not None
