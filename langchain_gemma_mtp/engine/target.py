"""The verifying model: a transformers causal LM driven one forward at a time, with KV rollback."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer

from ..errors import IncompatibleDrafterError
from .cache import LayerKV, cache_keep_then, keep_then, kv_layers, layer_kv, new_cache
from .head import ScreenedHead, greedy_rows
from .matmul import CHOOSER, FormChooser, measure_linears, project
from .packed import engine_attention
from .tree import DraftTree

log = logging.getLogger(__name__)

KV = dict[str, tuple[torch.Tensor, torch.Tensor]]
# An assistant config may map a layer type to the target layer whose K/V its layers of that type read
# ({"full_attention": 5}); unnamed types read the last target layer of their type. Only for targets
# whose cache the engine reads (Gemma 3): Gemma 4 targets hand over their own shared K/V.
KV_LAYERS_KEY = "target_kv_layers"
# An assistant config with this flag set drafts through its target's LM head: its checkpoint stores
# no vocabulary-sized matrix, and pairing binds the target's (TargetModel.pair).
SHARED_HEAD_FLAG = "shares_target_lm_head"
SHARED_HEAD_KEYS = ("lm_head.weight", "model.embed_tokens.weight")


def text_config_of(model: PreTrainedModel):
    """The text decoder's config (the whole config for text-only models)."""
    return model.config.get_text_config()


def kv_layer_problems(layer_types: Sequence[str], shares_kv: bool, chosen: dict[str, int]) -> list[str]:
    """Why `chosen` ({layer type: target layer}) cannot be the K/V an assistant reads from a target with
    these `layer_types` (`shares_kv`: a Gemma 4 target, which hands over its own)."""
    if not chosen:
        return []
    if shares_kv:
        return [f"it names target K/V layers ({KV_LAYERS_KEY}) but this target hands over its own shared K/V"]
    problems = []
    for layer_type, index in chosen.items():
        if not isinstance(index, int) or not 0 <= index < len(layer_types):
            problems.append(f"{KV_LAYERS_KEY}: {layer_type} reads layer {index!r}, not one of the target's 0..{len(layer_types) - 1}")
        elif layer_types[index] != layer_type:
            problems.append(f"{KV_LAYERS_KEY}: target layer {index} is {layer_types[index]}, not {layer_type}")
    return problems


@dataclass
class Forward:
    """What one target forward leaves for the next step."""

    hidden: torch.Tensor  # (L, H) final normed hidden states of the fed tokens
    shared_kv: KV | None  # keys/values the MTP drafter attends to, covering the cache
    logits: torch.Tensor | None = None  # the rows' logits, where the caller asked for them (engine/batch.py)
    argmax: torch.Tensor | None = None  # each row's greedy token instead, where that is all the caller needs


class TargetModel:
    """Splits a causal LM into decoder, head and softcap so we compute logits only where needed.

    Gemma 4 targets return `shared_kv_states` themselves; other targets with sliding and full
    layers (Gemma 3) hold the same tensors in their cache, read from the last layer of each type.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.config = text_config_of(model)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.vocab_size = int(self.config.vocab_size)
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        # The greedy choice in the faster of two forms, measured as the products are (engine/matmul.py):
        # from the head's own logits, or through an fp16 screen that proves the same tokens
        # (engine/head.py); with $GEMMA_MTP_MATMUL set, from the logits (bit-reproducible runs).
        self._greedy = FormChooser(
            "full" if CHOOSER.fixed else None,
            forms={"full": self._greedy_full, "screened": self._greedy_screened},
            tried_when={"screened": self._screens},
        )
        self._screen: ScreenedHead | None = None
        self._screenable: bool | None = None
        self._packing: threading.Thread | None = None  # the screen being built in the background (pack_screen)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.returns_shared_kv = hasattr(self.config, "kv_sharing_modes")
        has_ple = bool(getattr(self.config, "hidden_size_per_layer_input", 0))
        # Only Gemma 4 skips its kv-shared layers for positions whose logits are not needed, and
        # only with per-layer inputs (without them its slicing path crashes).
        self._prefill_keep = 1 if self.returns_shared_kv and has_ple and self.config.num_kv_shared_layers else None
        self.layer_types = list(getattr(self.config, "layer_types", None) or [])
        # Which layer's K/V the drafter reads per layer type: the last of each type, unless the paired
        # assistant names others (read_kv_from).
        self.default_kv_layers = {t: max(i for i, lt in enumerate(self.layer_types) if lt == t) for t in set(self.layer_types)}
        self.kv_layers = dict(self.default_kv_layers)
        measure_linears(self.decoder)

    def read_kv_from(self, chosen: dict[str, int]) -> None:
        """Hand the drafter the K/V of the layers in `chosen` (the last of each other type);
        IncompatibleDrafterError names a layer that does not exist or has another type."""
        problems = kv_layer_problems(self.layer_types, self.returns_shared_kv, chosen)
        if problems:
            raise IncompatibleDrafterError("; ".join(problems) + ". Name a target layer of the same attention type.")
        self.kv_layers = {**self.default_kv_layers, **chosen}

    def pair(self, assistant: PreTrainedModel) -> None:
        """Work with an MTP assistant: hand it the K/V of the layers it names (the last of each other
        type) and, when it shares this model's LM head, bind that head into it. The one place a pair
        is set up (MTPDrafter calls it); `loading.validate_mtp_pair` checks a pair and changes nothing."""
        self.read_kv_from(dict(getattr(assistant.config, KV_LAYERS_KEY, None) or {}))
        if getattr(assistant.config, SHARED_HEAD_FLAG, False):
            bind_shared_head(assistant, self)

    def new_cache(self, prefix: list[LayerKV] | None = None, length: int = 0) -> DynamicCache:
        """An empty cache, or one starting with the first `length` positions of a stored prefix."""
        return new_cache(self.config, prefix, length)

    def forward(
        self,
        token_ids: list[int] | torch.Tensor,
        cache: DynamicCache,
        *,
        prefill: bool = False,
        want_kv: bool = True,
        tree: DraftTree | None = None,
    ) -> Forward:
        """Feed tokens (ids, or a (1, L) tensor already on the device) after what `cache` holds;
        return final hidden states of the fed tokens. With `tree`, the tokens are its block
        (`tree.tokens(pending)`), each attending to the cache and its own ancestors only."""
        ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor([token_ids], device=self.device)
        mask, positions = self._tree_masks(cache, tree) if tree is not None else (None, None)
        out = self.run_decoder(ids, cache, mask, positions, want_kv=want_kv, keep=self._prefill_keep if prefill else None)
        kv = out.shared_kv_states if self.returns_shared_kv and want_kv else None
        return Forward(out.last_hidden_state[0], dict(kv) if kv is not None else None)

    def run_decoder(
        self, ids: torch.Tensor, cache, attention_mask=None, position_ids=None, *, want_kv: bool = True, keep: int | None = None, **extra
    ):
        """The decoder's own output for (B, L) ids after `cache` (a DynamicCache, or engine/batch.py's
        BatchCache), with explicit masks and positions where given; `keep`: Gemma 4's logits_to_keep;
        `extra`: keyword arguments the model hands down to its attention (engine/packed.py)."""
        self._screen_packed()  # a forward beside the packing thread would share the cores with it
        kwargs = {self._cache_kw: cache, "use_cache": True, **extra}
        if attention_mask is not None:
            kwargs["attention_mask"], kwargs["position_ids"] = attention_mask, position_ids
        if self.returns_shared_kv:
            kwargs["return_shared_kv_states"] = want_kv
            kwargs["logits_to_keep"] = keep
        # Gemma 4's sliced prefill tells sdpa apart by its name, so that forward keeps the model's own.
        if not self.verifies_trees or (self.returns_shared_kv and keep is not None):
            return self.decoder(input_ids=ids, **kwargs)
        with engine_attention(self.config):
            return self.decoder(input_ids=ids, **kwargs)

    @property
    def slices_prefill(self) -> bool:
        """Whether a prompt chunk alone runs the kv-shared layers at its last row only (Gemma 4), which
        several requests' chunks packed into one forward cannot (engine/batch.py runs those apart)."""
        return self._prefill_keep is not None

    @property
    def verifies_trees(self) -> bool:
        """Whether `forward` can take a tree: its masks are built for these attention kernels."""
        return self.config._attn_implementation in ("sdpa", "eager")

    def _tree_masks(self, cache: DynamicCache, tree: DraftTree) -> tuple[dict[str, torch.Tensor] | torch.Tensor, torch.Tensor]:
        """The attention masks and positions of a tree's block fed after what `cache` holds."""
        positions = cache.get_seq_length() + torch.tensor(tree.depths(), device=self.device)
        masks = {t: self.attention_mask(m[None, None]) for t, m in self.block_masks(cache, positions, tree.ancestry()).items()}
        return (masks if self.layer_types else masks["full_attention"]), positions[None]

    def block_masks(self, cache: DynamicCache, positions: torch.Tensor, ancestry: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer type, the (block, keys) bool mask of a block of tokens at `positions` fed after
        what `cache` holds, over what each layer hands attention (a sliding layer: only its window).
        Past keys are masked by position as the model's own masks do; block keys by `ancestry`
        ((block, block) bool: row i marks the block tokens token i attends to)."""
        width = len(positions)
        ancestry = ancestry.to(self.device)
        window = getattr(self.config, "sliding_window", None)
        masks = {}
        for layer_type in set(self.layer_types) or {"full_attention"}:
            first = self.layer_types.index(layer_type) if self.layer_types else 0
            kv_length, kv_offset = kv_layers(cache)[first].get_mask_sizes(width)
            seen = torch.cat([kv_offset + torch.arange(kv_length - width, device=self.device), positions])
            mask = torch.cat([torch.ones(width, kv_length - width, dtype=torch.bool, device=self.device), ancestry], dim=1)
            if layer_type == "sliding_attention":
                assert window is not None  # a model with sliding layers has a sliding_window
                mask &= seen[None, :] > positions[:, None] - window
            masks[layer_type] = mask
        return masks

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A bool mask in the form the model's attention takes: as is for sdpa, additive in the model's dtype for eager."""
        if self.config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        return mask

    def logits(self, hidden: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Logits for the given hidden rows (of the `vocab` slice of tokens), with the model's final softcap."""
        bias = getattr(self.lm_head, "bias", None)
        logits = project(hidden, self.lm_head.weight[vocab], None if bias is None else bias[vocab])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each hidden row's greedy token: the argmax of its logits, without keeping them (engine/head.py)."""
        return self._greedy(hidden, self.lm_head.weight)

    def _greedy_full(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return greedy_rows(lambda vocab: self.logits(hidden, vocab), hidden.shape[0], weight.shape[0], self.device)

    def pack_screen(self) -> None:
        """Build the fp16 greedy screen (engine/head.py) on a thread of its own, where it applies and
        the greedy form is measured: packing its copy of the head takes seconds on one core (4 s for
        the 270M's), which the rest of loading and the caller's own set-up then hide, where the
        first greedy request would otherwise wait for it. The target's first forward waits for it."""
        if self._greedy.fixed is None and self._packing is None and self._screen is None and self._screen_applies(self.lm_head.weight):
            # Not a daemon: an exit meanwhile waits for it, as a thread still inside torch aborts the process.
            self._packing = threading.Thread(target=self._build_screen, name="gemma-mtp-screen")
            self._packing.start()

    @property
    def packing_bytes(self) -> int:
        """Memory the screen's copy is still to take: all of it while it packs (some may be in use already)."""
        return self.lm_head.weight.numel() * 2 if self._packing is not None and self._packing.is_alive() else 0

    def _build_screen(self) -> None:
        try:
            with torch.inference_mode():
                self._screen = ScreenedHead(self.lm_head.weight, self.softcap)
        except Exception as e:  # no room for the copy, say: it is a speed-up, the logits serve without it
            self._screenable = False
            log.warning("the fp16 greedy screen was not built (%r); greedy tokens come from the logits", e)

    def _screen_packed(self) -> None:
        """Wait for the screen's background build, if one is running."""
        if self._packing is not None:
            self._packing.join()
            self._packing = None

    def _screen_applies(self, weight: torch.Tensor) -> bool:
        if self._screenable is None:  # once: it reads the whole weight
            self._screenable = ScreenedHead.applies(weight, getattr(self.lm_head, "bias", None))
        return self._screenable

    def _screens(self, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
        self._screen_packed()
        return self._screen_applies(weight) and hidden.dtype == torch.float32

    def _greedy_screened(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self._screens(hidden, weight):
            return self._greedy_full(hidden, weight)
        if self._screen is None:  # not built at load (a target made by hand): built here, once
            self._build_screen()
        ids = self._screen.greedy(hidden) if self._screen is not None else None
        return self._greedy_full(hidden, weight) if ids is None else ids

    def rollback(self, cache: DynamicCache, fwd: Forward, n_rejected: int, then: int | None = None) -> KV | None:
        """Drop the last `n_rejected` fed tokens from the cache, then, with `then` (a slot of the
        last forward's tokens among those dropped: an accepted sibling), put that token's K/V back
        after what remains. Return the drafter's K/V of what the cache now holds."""
        fed = fwd.hidden.shape[0]
        if then is None:
            cache.crop(-n_rejected)
        else:
            cache_keep_then(cache, cache.get_seq_length() - n_rejected, then - fed)
        if fwd.shared_kv is not None:
            if then is not None:
                return {
                    t: (keep_then(k, k.shape[-2] - n_rejected, then - fed), keep_then(v, v.shape[-2] - n_rejected, then - fed))
                    for t, (k, v) in fwd.shared_kv.items()
                }
            if not n_rejected:
                return fwd.shared_kv
            return {t: (k[:, :, :-n_rejected], v[:, :, :-n_rejected]) for t, (k, v) in fwd.shared_kv.items()}
        if not self.kv_layers:
            return None
        kv = {}
        for t, i in self.kv_layers.items():
            layer = kv_layers(cache)[i]
            keys, values = layer_kv(cache, i)
            if isinstance(layer, DynamicSlidingWindowLayer):  # the layer keeps its history; the drafter sees what attention sees
                keys, values = keys[..., 1 - layer.sliding_window :, :], values[..., 1 - layer.sliding_window :, :]
            kv[t] = (keys, values)
        return kv


def bind_shared_head(assistant: PreTrainedModel, target: TargetModel) -> None:
    """Make the assistant draft through the target's LM head weight (the same tensor, no copy); the
    assistant's tied input embedding, which it never reads, points at it too."""
    weight = target.lm_head.weight
    assistant.lm_head.weight = weight
    assistant.get_input_embeddings().weight = weight
