"""Resolve ids, paths and GGUF files to loaded models; pair a target with its drafter and validate the pair."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..errors import EmulatedDtypeWarning, IncompatibleDrafterError, InvalidRequestError, ModelLoadError, ModelNotFoundError
from .target import KV_LAYERS_KEY, SHARED_HEAD_FLAG, SHARED_HEAD_KEYS, TargetModel, kv_layer_problems, text_config_of

log = logging.getLogger(__name__)

ASSISTANT_MODEL_TYPES = ("gemma4_assistant",)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when torch has it, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPE_ENV = "GEMMA_MTP_DTYPE"  # the dtype used when none is passed (e.g. float32 for exact identity)


# CPU flags under which a half-precision matmul runs natively rather than emulated through float32.
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def _cpu_flags() -> set[str] | None:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to tell
        return None


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 matmuls natively (avx512_bf16 or AMX), where bf16 beats fp32."""
    return bool((_cpu_flags() or set()) & set(NATIVE_FLAGS[torch.bfloat16]))


def _warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    flags = _cpu_flags() if device.type == "cpu" and dtype in NATIVE_FLAGS else None
    if flags is not None and not flags & set(NATIVE_FLAGS[dtype]):
        warnings.warn(
            f"{dtype} is emulated on this CPU (it has none of {', '.join(NATIVE_FLAGS[dtype])}): float32 is several times "
            "faster here (3-4x for the Gemma 3 270M on an AVX2 CPU), at twice the weights' memory. Pass dtype='float32', "
            "or leave dtype unset for the faster one.",
            EmulatedDtypeWarning,
            stacklevel=3,
        )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype or its name. Default: $GEMMA_MTP_DTYPE if set, else bf16 on CUDA
    and on CPUs with native bf16 (measured faster, docs/benchmarks.md), else fp32. Only fp32 keeps
    speculative greedy output identical to plain greedy token for token."""
    source = "dtype"
    if dtype is None and os.environ.get(DTYPE_ENV):
        dtype, source = os.environ[DTYPE_ENV], f"${DTYPE_ENV}"
    if dtype is None:
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if fast_bf16 else torch.float32
    if not isinstance(dtype, torch.dtype):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(dtype, dtype)
        named = getattr(torch, str(name), None)
        if not isinstance(named, torch.dtype):
            raise InvalidRequestError(f"unknown {source} {dtype!r}: use 'float32', 'bfloat16' or 'float16'.")
        dtype = named
    _warn_if_emulated(dtype, device)
    return dtype


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """A local directory for a path or a hub id (from the local hub cache first, then the hub).

    revision and token reach the hub (a local directory has neither). Fails fast with
    ModelNotFoundError when offline or unreachable, naming how to pass a local dir, and for a gated
    or unknown repository how to log in.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name_or_path!s} is not a model directory: pass a folder holding config.json.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = str(name_or_path)
    try:
        return Path(snapshot_download(repo, local_files_only=True, revision=revision, token=token))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE is set" if offline else None
    login = ""
    if not offline:
        try:
            return Path(snapshot_download(repo, revision=revision, token=token))
        except Exception as exc:  # network refused, repo gated or missing: all end the same way
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if isinstance(exc, RepositoryNotFoundError):  # GatedRepoError is one too
                login = (
                    f" Gemma repositories are gated: accept the license at https://huggingface.co/{repo}, then log in "
                    "(`hf auth login`) or set HF_TOKEN (or pass model_kwargs={'token': ...}); check the id's spelling."
                )
    raise ModelNotFoundError(
        f"model {repo!r} is not in the local hub cache and could not be downloaded ({why}).{login} "
        "Download it where the hub is reachable (`huggingface-cli download " + repo + " --local-dir DIR`) "
        "and pass model=DIR, a local directory."
    )


def load_causal_lm(
    name_or_path: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype,
    gguf_file: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM (and its tokenizer when it has one) and check every weight was found.

    options: `revision` and `token` for the hub, `trust_remote_code` for config, model and tokenizer,
    `attn_implementation` for the model (ChatGemmaMTP's model_kwargs)."""
    options = dict(options or {})
    path = resolve_checkpoint(name_or_path, revision=options.pop("revision", None), token=options.pop("token", None))
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if "trust_remote_code" in options:
        kwargs["trust_remote_code"] = options.pop("trust_remote_code")
    try:
        shared = SHARED_HEAD_KEYS if getattr(AutoConfig.from_pretrained(path, **kwargs), SHARED_HEAD_FLAG, False) else ()
        # A head shared with the target is absent on purpose: keep transformers from reporting it.
        with _quiet_transformers(bool(shared)):
            # output_loading_info=True returns (model, info), which transformers' annotation does not say.
            model, info = cast(
                tuple[PreTrainedModel, dict[str, Any]],
                AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs, **options),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load {path}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k and k not in shared]
    if missing:
        # transformers fills missing weights with random values and only reports it; refuse instead.
        raise ModelLoadError(
            f"{path}: {len(missing)} weight(s) missing from the checkpoint (e.g. {missing[:3]}); "
            "the model class does not match the checkpoint, or it is incomplete."
        )
    # transformers wraps PreTrainedModel.to in a decorator whose annotation drops the bound self.
    model = model.to(device).eval()  # type: ignore[arg-type]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception:  # the engine works on ids; a checkpoint without a tokenizer is fine
        tokenizer = None
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def is_assistant_checkpoint(name_or_path: str | os.PathLike, token: str | bool | None = None) -> bool:
    config = AutoConfig.from_pretrained(resolve_checkpoint(name_or_path, token=token))
    return config.model_type in ASSISTANT_MODEL_TYPES


def find_assistant(model: str | os.PathLike, token: str | bool | None = None) -> str | None:
    """The MTP assistant that pairs with `model`: `X-assistant` beside a local dir or on the hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        for candidate in (path.parent / f"{path.name}-assistant", path / "assistant"):
            if (candidate / "config.json").is_file():
                return str(candidate)
        return None
    repo = f"{model}-assistant"
    try:
        resolve_checkpoint(repo, token=token)
    except ModelNotFoundError:
        return None
    return repo


def layer_attr(config, layer_idx: int, name: str):
    """A per-layer attribute (head_dim, num_key_value_heads) of a possibly heterogeneous config."""
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer is not None:
        return getattr(per_layer[layer_idx], name)
    return getattr(config, name)


def kv_source_layer(target: TargetModel, layer_type: str) -> int:
    """The target layer whose K/V an assistant layer of `layer_type` reads (the last one of that type
    that computes its own K/V, or the one the paired assistant names)."""
    tc = target.config
    if target.returns_shared_kv:
        modes = tc.kv_sharing_modes
        return max(i for i, lt in enumerate(tc.layer_types) if lt == layer_type and modes[i] != "reuse")
    return target.kv_layers[layer_type]


def validate_mtp_pair(target: TargetModel, assistant: PreTrainedModel) -> None:
    """Raise IncompatibleDrafterError unless the assistant can read this target's K/V and hidden state.
    Changes nothing: `TargetModel.pair` sets the pair up."""
    tc, ac = target.config, assistant.config
    atc = ac.get_text_config()
    problems = []
    if atc.vocab_size != tc.vocab_size:
        problems.append(f"vocab size {atc.vocab_size} != target's {tc.vocab_size}")
    if ac.backbone_hidden_size != tc.hidden_size:
        problems.append(f"backbone_hidden_size {ac.backbone_hidden_size} != target hidden size {tc.hidden_size}")
    if not target.kv_layers:
        problems.append("the target has no sliding/full layer types to share K/V from")
    chosen = dict(getattr(ac, KV_LAYERS_KEY, None) or {})
    kv_problems = kv_layer_problems(target.layer_types, target.returns_shared_kv, chosen)
    problems += kv_problems
    sources = {**target.default_kv_layers, **({} if kv_problems else chosen)}
    for i, layer_type in enumerate(atc.layer_types):
        if layer_type not in target.kv_layers:
            problems.append(f"assistant layer {i} reads {layer_type} K/V, which the target does not have")
            continue
        j = kv_source_layer(target, layer_type) if target.returns_shared_kv else sources[layer_type]
        for attr in ("head_dim", "num_key_value_heads"):
            a, t = layer_attr(atc, i, attr), layer_attr(tc, j, attr)
            if a != t:
                problems.append(f"{layer_type} {attr} {a} != target's {t}")
    rope_a, rope_t = getattr(atc, "rope_parameters", None), getattr(tc, "rope_parameters", None)
    if isinstance(rope_a, dict) and isinstance(rope_t, dict):
        for layer_type in set(atc.layer_types):
            a, t = rope_a.get(layer_type, rope_a), rope_t.get(layer_type, rope_t)
            if a != t:
                problems.append(f"{layer_type} rope parameters {a} != target's {t}")
    if "sliding_attention" in atc.layer_types and atc.sliding_window != getattr(tc, "sliding_window", None):
        problems.append(f"sliding_window {atc.sliding_window} != target's {getattr(tc, 'sliding_window', None)}")
    shares_head = getattr(ac, SHARED_HEAD_FLAG, False)
    if shares_head and atc.hidden_size != tc.hidden_size:
        problems.append(f"it shares the target's LM head but its hidden size {atc.hidden_size} != target's {tc.hidden_size}")
    if problems:
        raise IncompatibleDrafterError(
            "this MTP assistant does not match the target: "
            + "; ".join(dict.fromkeys(problems))
            + ". Use the assistant released with (or distilled for) this target (X-assistant for X), or drafter='ngram'."
        )


def validate_draft_model(target: TargetModel, draft: TargetModel) -> None:
    if draft.vocab_size != target.vocab_size:
        raise IncompatibleDrafterError(
            f"draft model vocab size {draft.vocab_size} != target's {target.vocab_size}: a draft model must share "
            "the target's tokenizer. Use a smaller model of the same family, or drafter='ngram'."
        )


def stop_ids_of(model: PreTrainedModel) -> frozenset[int]:
    """Stop tokens from the checkpoint's generation config (eos_token_id may be a list)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(text_config_of(model), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
