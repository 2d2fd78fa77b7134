"""EngineSpec: what decides which engine serves a model, both how it is built and its registry key.

Torch-free, so the LangChain class and the server can name an engine (and share it) before
anything loads. Settings equal to their default are stored as None: `prefix_cache_mb` spelled
out at its default is the default engine, not a second copy of the model. The MTP settings have no
fixed default to spell out: left None, the draft schedule sets them per step from measured costs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .draft_settings import MTP_DRAFTERS, check_drafter_name, mtp_settings
from .errors import InvalidRequestError

DEFAULT_PREFIX_CACHE_MB = 1024
"""Memory for the KV caches of recent requests (the prefix cache), per engine."""
LOAD_OPTIONS = frozenset({"revision", "token", "attn_implementation", "trust_remote_code"})
"""What `model_kwargs` may pass to `from_pretrained`: revision and token reach the hub, the rest the model."""


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its model, drafter, assistant, placement and drafter settings (hashable)."""

    model: str
    drafter: str = "auto"
    assistant: str | None = None
    device: str | None = None
    dtype: str | None = None
    gguf_file: str | None = None
    mtp_stop_below: float | None = None  # None: the schedule's per step (schedule.DraftPlan)
    mtp_siblings: int | None = None  # None: the schedule's per step
    load_options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs of LOAD_OPTIONS
    prefix_cache_mb: float | None = None  # None: DEFAULT_PREFIX_CACHE_MB

    @classmethod
    def of(
        cls,
        model: str | os.PathLike[str],
        drafter: str = "auto",
        assistant: str | os.PathLike[str] | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        gguf_file: str | None = None,
        mtp_stop_below: float | None = None,
        mtp_siblings: int | None = None,
        load_options: Mapping[str, Any] | None = None,
        prefix_cache_mb: float | None = None,
    ) -> EngineSpec:
        """A checked spec; InvalidRequestError names a bad value before anything loads."""
        check_drafter_name(drafter)
        given = mtp_settings(mtp_stop_below, mtp_siblings)
        if given and drafter not in ("auto", *MTP_DRAFTERS):
            raise mtp_settings_refused(given, drafter)
        if drafter == "draft_model" and assistant is None:
            raise InvalidRequestError("drafter='draft_model' needs assistant=<a smaller model of the same family>.")
        if prefix_cache_mb is not None and (isinstance(prefix_cache_mb, bool) or not prefix_cache_mb >= 0):
            raise InvalidRequestError(f"prefix_cache_mb must be a number >= 0 (0 turns the prefix cache off), got {prefix_cache_mb!r}.")
        return cls(
            model=str(model),
            drafter=drafter,
            assistant=None if assistant is None else str(assistant),
            device=None if device is None else str(device),
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
            gguf_file=gguf_file,
            mtp_stop_below=given.get("mtp_stop_below"),
            mtp_siblings=given.get("mtp_siblings"),
            load_options=check_load_options(load_options),
            prefix_cache_mb=None if prefix_cache_mb == DEFAULT_PREFIX_CACHE_MB else prefix_cache_mb,
        )

    @property
    def cache_mb(self) -> float:
        return DEFAULT_PREFIX_CACHE_MB if self.prefix_cache_mb is None else self.prefix_cache_mb

    @property
    def mtp_given(self) -> dict[str, float | int]:
        """The MTP settings the caller set, by their `mtp_` names."""
        given: dict[str, float | int] = {}
        if self.mtp_stop_below is not None:
            given["mtp_stop_below"] = self.mtp_stop_below
        if self.mtp_siblings is not None:
            given["mtp_siblings"] = self.mtp_siblings
        return given


def mtp_settings_refused(given: Mapping[str, Any], drafter: str) -> InvalidRequestError:
    """The error for MTP settings given to an engine that drafts some other way."""
    names = " and ".join(given)
    return InvalidRequestError(
        f"{names} only {'applies' if len(given) == 1 else 'apply'} to MTP drafting, and this engine drafts with {drafter!r}: "
        f"pass drafter='mtp' or 'hybrid' with an MTP assistant, or leave {names} unset."
    )


def check_load_options(options: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """`model_kwargs` as sorted (name, value) pairs; InvalidRequestError for an unknown name."""
    unknown = sorted(set(options or {}) - LOAD_OPTIONS)
    if unknown:
        raise InvalidRequestError(f"unknown model_kwargs {unknown}: use {sorted(LOAD_OPTIONS)}.")
    return tuple(sorted((options or {}).items()))
