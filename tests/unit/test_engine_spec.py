"""EngineSpec is how an engine is built and its registry key; build_drafter is the one place drafters are made from names."""

from __future__ import annotations

import pytest
import torch

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import HybridDrafter, MTPDrafter, NgramDrafter
from langchain_gemma_mtp.engine.loading import load_causal_lm, validate_mtp_pair
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine_spec import DEFAULT_PREFIX_CACHE_MB, EngineSpec
from langchain_gemma_mtp.errors import InvalidRequestError


def test_defaults_spelled_out_are_the_default_spec() -> None:
    plain = EngineSpec.of("m")
    spelled = EngineSpec.of("m", "auto", prefix_cache_mb=DEFAULT_PREFIX_CACHE_MB, load_options={})
    assert spelled == plain and hash(spelled) == hash(plain)
    # Unset MTP settings are the schedule's to choose; a value equal to the old default pins it.
    assert EngineSpec.of("m", mtp_stop_below=0.3) != plain
    assert EngineSpec.of("m", dtype=torch.bfloat16) == EngineSpec.of("m", dtype="bfloat16")
    assert EngineSpec.of("m", mtp_siblings=0) != plain
    assert EngineSpec.of("m", load_options={"revision": "a", "token": "t"}).load_options == (("revision", "a"), ("token", "t"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drafter": "ngram", "mtp_stop_below": 0.2}, "only applies to MTP drafting"),
        ({"drafter": "draft_model"}, "needs assistant="),
        ({"drafter": "magic"}, "unknown drafter"),
        ({"mtp_siblings": 99}, "siblings must be an int"),
        ({"prefix_cache_mb": -1}, "prefix_cache_mb must be a number >= 0"),
        ({"load_options": {"cache_dir": "/x"}}, "unknown model_kwargs"),
    ],
)
def test_bad_specs_are_refused_before_anything_loads(kwargs, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EngineSpec.of("/no/such/model", **kwargs)


def test_an_engine_records_its_resolved_spec(checkpoints) -> None:
    engine = Engine.from_spec(EngineSpec.of(checkpoints["noshare"]))
    # "auto" resolved: the assistant beside the model was found, and drafts as hybrid.
    assert isinstance(engine.drafter, HybridDrafter)
    assert engine.spec.drafter == "hybrid" and engine.spec.assistant == str(checkpoints["noshare"]) + "-assistant"
    lonely = Engine.from_spec(EngineSpec.of(checkpoints["noshare"], "ngram"))
    assert isinstance(lonely.drafter, NgramDrafter) and lonely.spec.assistant is None


def test_validating_a_pair_changes_nothing_and_building_the_drafter_pairs_it(checkpoints) -> None:
    path = checkpoints["gemma3"]
    target = TargetModel(load_causal_lm(path, torch.device("cpu"), torch.float32)[0])
    assistant, _ = load_causal_lm(path.parent / "gemma3-assistant", torch.device("cpu"), torch.float32)
    assistant.config.target_kv_layers = {"full_attention": 1}  # not the default: the last full layer, 3
    before = dict(target.kv_layers)
    validate_mtp_pair(target, assistant)
    assert target.kv_layers == before and before["full_attention"] == 3  # a check only
    MTPDrafter(assistant, target)
    assert target.kv_layers["full_attention"] == 1  # the pair is set up where the drafter is built
