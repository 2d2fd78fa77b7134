"""The product `x @ W.T` of a linear layer or the LM head, in the form this CPU runs fastest.

`F.linear(x, W)` (what transformers runs), the same product written `(W @ x.T).T`, and oneDNN's inner
product reach different kernels, and which is fastest at the few rows a decode or verification step
has depends on the CPU: float32 on an AMX Xeon, `linear` 23.5 ms against 74 for one row of the 270M's
262k-row head; on an AVX2 EPYC, `W @ x.T` 37 ms against 112 at 5 rows, and oneDNN 25 against 48 at
one row (docs/research-notes.md, "Kernel forms on an AVX2 CPU" and "oneDNN's inner product"). None
is right everywhere, so on CPU every product shape and width bucket is decided by timing its own
first calls, each form in turn, and keeps the fastest. Every form computes the same sums; only the
rounding can differ.

$GEMMA_MTP_MATMUL=linear, =transposed, =paired (one row fed as two) or =onednn fixes the form (bit-reproducible
runs across processes).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequestError

FORM_ENV = "GEMMA_MTP_MATMUL"
# Timed calls per form before a bucket is decided; each form's first call is a warm-up and not counted.
TRIALS = 3
# ...and at least this much counted time per form: a body layer's product takes 0.1-0.5 ms, where
# three calls (all within one forward) leave the choice to the timer's and the OS's noise.
TRIAL_SECONDS = 0.005
TRIAL_CALLS = 64  # ...or this many counted calls, for products too small for their form to matter


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Contiguous, as `linear` returns: the copy is part of what the form costs.
    flat = x.reshape(-1, x.shape[-1])
    return (weight @ flat.T).T.contiguous().view(*x.shape[:-1], weight.shape[0])


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def _paired(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # One row fed as two: a matrix-vector product can take a slower kernel than a two-column one
    # (the 270M's head on the EPYC, 42 -> 27 ms). Each row's sums are the same either way.
    if not _one_row(x, weight):
        return _transposed(x, weight)
    return _transposed(x.reshape(1, x.shape[-1]).repeat(2, 1), weight)[:1].view(*x.shape[:-1], weight.shape[0])


# oneDNN's inner product (what torch.compile emits for a float32 linear on CPU) with the weight as
# it is: no packed copy. It has its own AVX2 kernels, where MKL's sgemm takes slower paths on some
# CPUs at few rows (the 270M's head on the EPYC: 25 ms at one row against 48, 69 at 16 against 101).
def _onednn_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _probe_onednn() -> bool:
    """The op is private (torch.compile's): check once that this build has it and that it computes the product."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, weight = torch.ones(2, 8), torch.arange(24, dtype=torch.float32).view(3, 8)
    try:
        return torch.equal(_onednn_product(x, weight), F.linear(x, weight))
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _probe_onednn()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # float32 only: its bf16 kernels need avx512 or avx_ne_convert, and reject the call elsewhere.
    return ONEDNN and x.dtype == weight.dtype == torch.float32


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _onednn_product(x, weight) if _onednn_applies(x, weight) else F.linear(x, weight)


FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": _linear,
    "transposed": _transposed,
    "paired": _paired,  # tried for one row only (more rows run `transposed`)
    "onednn": _onednn,  # tried for float32 only (other dtypes run `linear`)
}


# When a form is worth a trial rather than a copy of another form's work (the others: always); the
# form itself falls back under the same test, for a fixed $GEMMA_MTP_MATMUL.
TRIED_WHEN: dict[str, Callable[[torch.Tensor, torch.Tensor], bool]] = {"paired": _one_row, "onednn": _onednn_applies}


class FormChooser:
    """Picks a form (of `forms`: the products by default; the first is the fallback off CPU) per
    (weight shape, dtype, power-of-two row bucket) from its own calls: until a
    bucket is decided its calls alternate forms and are timed (real work, nothing run twice), each
    form's first call not counted, until every form has TRIALS counted calls and TRIAL_SECONDS of
    them (or TRIAL_CALLS); then the form with the fastest counted call runs. `clock` is injectable
    for tests. Used from the engine's owner thread; off CPU (or with $GEMMA_MTP_MATMUL set) the
    form is fixed."""

    def __init__(
        self,
        fixed: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        forms: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = FORMS,
        tried_when: dict[str, Callable[[torch.Tensor, torch.Tensor], bool]] = TRIED_WHEN,
    ) -> None:
        if fixed is not None and fixed not in forms:
            raise InvalidRequestError(f"unknown ${FORM_ENV} {fixed!r}: use {', '.join(forms)}, or unset it to measure.")
        self.fixed = fixed
        self.clock = clock
        self.forms = forms
        self.tried_when = tried_when
        self.chosen: dict[tuple, str] = {}
        self._times: dict[tuple, dict[str, list[float]]] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None or x.device.type != "cpu":
            return self.forms[self.fixed or next(iter(self.forms))](x, weight)
        rows = x.numel() // x.shape[-1]
        key = (tuple(weight.shape), weight.dtype, max(rows - 1, 0).bit_length())
        form = self.chosen.get(key)
        if form is not None:
            return self.forms[form](x, weight)
        times = self._times.setdefault(key, {name: [] for name in self.forms if self._applies(name, x, weight)})
        form = min(times, key=lambda name: len(times[name]))
        start = self.clock()
        out = self.forms[form](x, weight)
        times[form].append(self.clock() - start)
        if all(len(t) > TRIALS and (sum(t[1:]) >= TRIAL_SECONDS or len(t) > TRIAL_CALLS) for t in times.values()):
            self.chosen[key] = min(times, key=lambda name: min(times[name][1:]))
            self._times.pop(key, None)  # another thread may have decided it too
        return out

    def _applies(self, form: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
        test = self.tried_when.get(form)
        return test is None or test(x, weight)


# One per process: a shape's best form is a property of the CPU, shared by every model using it.
CHOOSER = FormChooser(os.environ.get(FORM_ENV) or None)


_OWNER = threading.local()


@contextmanager
def measured_forms() -> Iterator[None]:
    """On this thread (the engine's owner thread), measured linears run in their faster form; on
    others (the user's own calls on the same model, transformers' `generate`) they run `linear`."""
    _OWNER.on = True
    try:
        yield
    finally:
        _OWNER.on = False


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: in the faster form inside `measured_forms`, as `linear` elsewhere."""
    if not getattr(_OWNER, "on", False):
        return F.linear(x, weight, bias)
    out = CHOOSER(x, weight)
    return out if bias is None else out + bias


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return project(x, module.weight, module.bias)


def measure_linears(model: nn.Module) -> None:
    """Let every `nn.Linear` of `model` run through `project` inside `measured_forms` (on CPU only;
    the module computes as before everywhere else)."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            module.forward = partial(_forward, module)  # type: ignore[method-assign]
