"""Measured step costs of one engine: target forward seconds by verified width, drafter seconds per draft token.

The draft schedule (schedule.py) prices a plan in units of one single-row target forward:

    time(rows, drafts) = share * (1 - row) + row * rows + call + draft * drafts   (call: only if drafts)

where `share` is the request's part of the forward's fixed cost (the weights are read once for the
whole batch): 1 alone, 1/B in a verification forward over B requests (engine/batch.py), which makes
rows dear beside what they save, so batched requests draft shorter. `CostModel` fits `row`, `call`
and `draft` online from the steps the engine runs, and takes `share` from its last verification forward. Forward seconds are kept
as decayed means per width bucket (powers of two, so a width the schedule left long ago is still
remembered), and a line base + slope * width is fitted through the bucket means by weighted least
squares, with a ridge prior that pulls the slope towards the prior's relative row cost: while every
step verifies about the same width (a fixed chain), the data cannot tell the slope and the prior
holds it. A bucket seen often enough also keeps its own excess over the line, because the matrix
kernels step rather than slope: in float32 on a 2-core CPU a Gemma 4 E2B-shaped body costs the same
at 1-3 rows and nearly double at 4 (docs/research-notes.md), and a line through both would draft
past the step. An untimed bucket is priced on the line alone; where the prior holds the slope
that can make it look cheap, and then the schedule tries it and times it. The excess prices a
request's own forward; a shared forward's width is every request's rows together, which one
request's plan does not set, so there the line alone applies.
Draft seconds are fitted the same way, as a line call + draft * tokens through each drafter call's
seconds per request against its draft tokens per request: a drafter call has a fixed part (the
distilled MTP drafter on the 270M: about 1.8 ms a call and 2.8 ms a token, where seconds per token
read 3.4-3.9 ms at its usual 3-4 tokens), which a longer draft pays once, so pricing it per token
would draft too short and stop early too soon. The line is pulled towards the origin with the
weight of DRAFT_ORIGIN_WEIGHT calls that drafted nothing in no time (true of a call that never
runs): while every call drafts the same count the data cannot tell the fixed part, and the pull
makes it zero, which prices as seconds per token did. An observation over OUTLIER times the
current estimate is clipped to that (a step descheduled by another process must not swing the
fit), and a first observation or two over OUTLIER times the next are dropped (warm-up).

Before MIN_FORWARDS forwards and MIN_DRAFTS draft tokens were seen, or when `learning` is off, the
prior applies: the drafter's constant cost per draft token split into PRIOR_ROW_COST of wider
verification and the rest drafting, with no fixed part, which reproduces the constant-cost schedule
exactly.

Timing is honest only where the work has finished when the clock stops. On CPU torch runs
synchronously. On CUDA kernels are queued: the worker synchronises the device before it stops a
forward's clock, and stops the drafter's after `propose`, which copies its draft ids to the host
(every drafter does); the step before ended on such a copy, so the device is idle when each clock
starts. Code that times anything else must synchronise first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

PRIOR_ROW_COST = 0.05
"""The prior's cost of one more verified row, relative to a single-row forward: the share of every
drafter's constant `cost_per_draft_token` that is verification (the rest is the drafter's step)."""
DECAY = 0.97  # per observation in a bucket: recent steps matter more, and a changed machine load is followed
MIN_FORWARDS = 8
MIN_DRAFTS = 8
OUTLIER = 4.0
SLOPE_PRIOR_WEIGHT = 64.0
"""What the slope prior weighs, in forwards x rows^2: as much as one forward 8 rows from the mean
width tells about the slope. Forwards at one width tell nothing, and then the prior decides."""
DRAFT_ORIGIN_WEIGHT = 1.0  # drafter calls' worth of pull towards "no tokens, no time" (see the module docstring)
MIN_BUCKET_WEIGHT = 3.0  # decayed observations before a width bucket's own excess over the line counts
MAX_WIDTH = 4096  # wider forwards are prefill, not verification (a packed forward of many requests' drafts stays under it)


@dataclass(frozen=True)
class StepCosts:
    """Costs relative to a single-row target forward: `row` per verified row beyond the first,
    `draft` per draft token the drafter proposes, `call` once per step that drafts (the drafter
    call's fixed part, per request); `measured` False while the prior applies."""

    row: float
    draft: float
    measured: bool = False
    call: float = 0.0
    share: float = 1.0  # the request's part of a forward's fixed cost: 1 / the requests it verifies beside
    excess: tuple[float, ...] = ()  # by width.bit_length(): a bucket's measured excess over the line (0: unseen)

    def time(self, rows: int, drafts: int) -> float:
        """A step verifying `rows` rows after `drafts` draft tokens, in single-row forwards (this
        request's part of a shared forward)."""
        time = self.share * (1.0 - self.row) + self.row * rows + self.draft * drafts + (self.call if drafts else 0.0)
        bucket = rows.bit_length()
        if self.share == 1.0 and bucket < len(self.excess):
            time += self.excess[bucket]
        return time

    @classmethod
    def prior(cls, cost_per_draft_token: float) -> StepCosts:
        """The constant-cost schedule's prices: one draft token costs `cost_per_draft_token` in all."""
        row = min(PRIOR_ROW_COST, cost_per_draft_token)
        return cls(row, cost_per_draft_token - row)


@dataclass
class _Mean:
    """Decayed sums of (x, y) pairs: their means, and the sums a least-squares line needs.
    `proportional`: y grows with x (a drafter call's seconds with its tokens), so an outlier is
    judged by y per x; else by y."""

    proportional: bool = False
    weight: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        if self.proportional:
            usual = x * self.y / self.x if self.x else 0.0  # the seconds so many tokens usually take
        else:
            usual = self.y / self.weight if self.weight else 0.0
        if self.weight >= 3:
            y = min(y, OUTLIER * usual)
        elif self.weight and y * OUTLIER < usual:
            self.weight = self.x = self.y = self.xx = self.xy = 0.0  # what came before was a warm-up (a first call's kernel choice)
        self.weight = DECAY * self.weight + 1.0
        self.x = DECAY * self.x + x
        self.y = DECAY * self.y + y
        self.xx = DECAY * self.xx + x * x
        self.xy = DECAY * self.xy + x * y

    def pulled_to_origin(self, weight: float) -> tuple[float, float]:
        """(intercept, slope) of the least-squares line through these pairs and `weight` more at
        (0, 0), which pull it towards the origin; both at least 0 (a negative part is noise: the
        other takes all)."""
        n, sx, sy, sxx, sxy = self.weight + weight, self.x, self.y, self.xx, self.xy
        det = n * sxx - sx * sx
        intercept = (sy * sxx - sx * sxy) / det if det > 0 else 0.0
        slope = (n * sxy - sx * sy) / det if det > 0 else 0.0
        if intercept < 0 or det <= 0:
            return 0.0, sxy / sxx if sxx else 0.0
        if slope < 0:
            return sy / n, 0.0
        return intercept, slope


class CostModel:
    """One engine's measured step costs (thread-safe; cheap: a few float updates per step)."""

    def __init__(self, cost_per_draft_token: float, *, learning: bool = True):
        self.prior = StepCosts.prior(cost_per_draft_token)
        self.learning = learning  # off: the prior always applies (the constant-cost schedule)
        self._lock = threading.Lock()
        self._buckets: dict[int, _Mean] = {}
        self._draft = _Mean(proportional=True)  # per drafter call: (draft tokens, seconds) per request
        self.forwards = 0  # observations taken, for stats
        self.draft_tokens = 0
        self.sharing = 1  # requests in the last verification forward

    def observe_forward(self, width: int, seconds: float, requests: int | None = None) -> None:
        """One target forward that ran `width` rows in all (in a batched forward: every request's
        rows together) and took `seconds`; `requests`: the requests a verification forward verified
        (None for a prompt chunk), whose count prices the next plans."""
        if requests is not None:
            self.sharing = max(1, requests)
        if not 1 <= width <= MAX_WIDTH or not seconds > 0:
            return
        with self._lock:
            self._buckets.setdefault(width.bit_length(), _Mean()).add(width, seconds)
            self.forwards += 1

    def observe_draft(self, steps: int, seconds: float, requests: int = 1) -> None:
        """A drafter call for `requests` requests that proposed `steps` draft tokens in all in
        `seconds` (nothing proposed: not priced)."""
        if steps <= 0 or not seconds >= 0 or requests < 1:
            return
        with self._lock:
            # Per request: a batched call's fixed part is shared as its forward's is.
            self._draft.add(steps / requests, seconds / requests)
            self.draft_tokens += steps

    def _line(self) -> tuple[float, float] | None:
        """(base, slope) in seconds of forward time = base + slope * width, or None before any forward."""
        points = [(m.weight, m.x / m.weight, m.y / m.weight) for m in self._buckets.values() if m.weight > 0]
        if not points:
            return None
        n = sum(w for w, _, _ in points)
        sw = sum(w * x for w, x, _ in points)
        sww = sum(w * x * x for w, x, _ in points)
        st = sum(w * t for w, _, t in points)
        swt = sum(w * x * t for w, x, t in points)
        # Ridge on slope - s0 * base (s0: the prior's slope relative to the base), strength L.
        s0, big_l = self.prior.row, SLOPE_PRIOR_WEIGHT
        a11, a12, a22 = n + big_l * s0 * s0, sw - big_l * s0, sww + big_l
        det = a11 * a22 - a12 * a12
        base = (st * a22 - a12 * swt) / det
        slope = (a11 * swt - a12 * st) / det
        # Wider never verifies faster: noise that says so is read as a flat cost.
        if slope < 0:
            slope, base = 0.0, st / n
        return base, slope

    def relative(self) -> StepCosts:
        """The costs the schedule prices plans with: measured once enough steps were seen, else the prior."""
        with self._lock:
            line = self._line()
            if not self.learning or line is None or self.forwards < MIN_FORWARDS or self.draft_tokens < MIN_DRAFTS:
                return self.prior
            base, slope = line
            one_row = base + slope
            if not one_row > 0:
                return self.prior
            excess = [0.0] * (max(self._buckets) + 1)
            for bucket, m in self._buckets.items():
                if m.weight >= MIN_BUCKET_WEIGHT:
                    excess[bucket] = (m.y / m.weight - base - slope * m.x / m.weight) / one_row
            call, draft = self._draft.pulled_to_origin(DRAFT_ORIGIN_WEIGHT)
            return StepCosts(
                slope / one_row, draft / one_row, measured=True, call=call / one_row, share=1.0 / self.sharing, excess=tuple(excess)
            )

    def snapshot(self) -> dict[str, float | int | bool]:
        """The fitted costs, for stats, metrics and the engine's repr: seconds of a single-row forward
        (0 before any), of each further verified row, of a draft token and of a drafter call's fixed
        part (0 before any), the relative costs the schedule uses, the requests the last verification
        forward shared, and how many observations they rest on."""
        costs = self.relative()
        with self._lock:
            line = self._line()
            call_s, draft_s = self._draft.pulled_to_origin(DRAFT_ORIGIN_WEIGHT)
            return {
                "forward_s": line[0] + line[1] if line else 0.0,
                "row_s": line[1] if line else 0.0,
                "draft_token_s": draft_s,
                "draft_call_s": call_s,
                "row_cost": costs.row,
                "draft_cost": costs.draft,
                "draft_call_cost": costs.call,
                "measured": costs.measured,
                "sharing": self.sharing,
                "forwards": self.forwards,
                "draft_tokens": self.draft_tokens,
            }
