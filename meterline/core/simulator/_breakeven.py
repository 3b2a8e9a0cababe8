"""Exact break-even volumes: a candidate's bill as a piecewise-linear function of token volume.

Why a function and not a search: every plan shape meterline rates (fee, allowances, per-million or
rate-card overage, graduated or volume tiers, cap, block, minimum commitment) is piecewise linear
in the period's token volume once the customer's *mix* (which share of its tokens falls in each
allowance's scope, and what a token costs at its rate card) is fixed. So the bills of two
candidates cross where a linear equation ``a + b*v = 0`` holds on some piece, and that root is a
:class:`fractions.Fraction`: exact, e.g. flat $25 against $3/M pay-per-token crosses at
``25000000/3`` tokens (8,333,333.33...). JSON carries it as ``{"exact": "25000000/3",
"tokens": "8333333.333333", "terminates": false}`` (the decimal is the exact value truncated
toward zero to 6 places, for reading only; ``terminates`` says whether it is exact).

Money inside is picos (int or Fraction of picos), never float. The curve reproduces
:func:`meterline.core.plans.rate_period` for one full period at any volume (the tests check it at the
real volume); it is an analysis of the same rules, not a second biller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from meterline.core.plans import TOKEN_CLASSES, Overage, PlanVersion, TierStep, Usage

__all__ = ["PL", "Mix", "crossings", "fraction_json", "mix_of", "payg_curve", "plan_curve"]

_ZERO = Fraction(0)


@dataclass(frozen=True, slots=True)
class PL:
    """A piecewise-linear function on ``[0, inf)``: on ``[xs[i], xs[i+1])`` (the last piece is
    unbounded) it is ``a[i] + b[i]*x``. ``xs[0] == 0``. May jump at a breakpoint (volume tiers)."""

    xs: tuple[Fraction, ...]
    a: tuple[Fraction, ...]
    b: tuple[Fraction, ...]

    @staticmethod
    def line(a: Fraction | int, b: Fraction | int) -> PL:
        return PL((_ZERO,), (Fraction(a),), (Fraction(b),))

    def piece(self, x: Fraction) -> int:
        i = 0
        for j, s in enumerate(self.xs):
            if s <= x:
                i = j
        return i

    def at(self, x: Fraction | int) -> Fraction:
        x = Fraction(x)
        i = self.piece(x)
        return self.a[i] + self.b[i] * x

    def _on(self, xs: Sequence[Fraction]) -> PL:
        """The same function on the finer breakpoints ``xs`` (a superset of ``self.xs``)."""
        a, b = [], []
        for x in xs:
            i = self.piece(x)
            a.append(self.a[i])
            b.append(self.b[i])
        return PL(tuple(xs), tuple(a), tuple(b))

    def __add__(self, other: PL) -> PL:
        xs = sorted(set(self.xs) | set(other.xs))
        p, q = self._on(xs), other._on(xs)
        return PL(
            tuple(xs),
            tuple(x + y for x, y in zip(p.a, q.a, strict=True)),
            tuple(x + y for x, y in zip(p.b, q.b, strict=True)),
        )

    def __neg__(self) -> PL:
        return PL(self.xs, tuple(-x for x in self.a), tuple(-x for x in self.b))

    def __sub__(self, other: PL) -> PL:
        return self + (-other)

    def plus(self, c: Fraction | int) -> PL:
        return PL(self.xs, tuple(x + c for x in self.a), self.b)

    def positive(self) -> PL:
        """``max(f, 0)``: each piece split where it crosses zero."""
        xs: list[Fraction] = []
        a: list[Fraction] = []
        b: list[Fraction] = []
        for i, x0 in enumerate(self.xs):
            x1 = self.xs[i + 1] if i + 1 < len(self.xs) else None
            ai, bi = self.a[i], self.b[i]
            cuts = [x0]
            if bi != 0:
                r = -ai / bi
                if r > x0 and (x1 is None or r < x1):
                    cuts.append(r)
            for c in cuts:
                xs.append(c)
                nxt = [k for k in cuts if k > c]
                hi = nxt[0] if nxt else x1
                mid = c + 1 if hi is None else (c + hi) / 2
                if ai + bi * mid > 0:
                    a.append(ai)
                    b.append(bi)
                else:
                    a.append(_ZERO)
                    b.append(_ZERO)
        return PL(tuple(xs), tuple(a), tuple(b))

    def at_most(self, c: Fraction | int) -> PL:
        return self - (self.plus(-c)).positive()

    def at_least(self, c: Fraction | int) -> PL:
        return (self.plus(-c)).positive().plus(c)

    def compose(self, inner: PL) -> PL:
        """``self(inner(x))`` for a continuous non-decreasing ``inner`` (an overage quantity)."""
        xs = set(inner.xs)
        for i, x0 in enumerate(inner.xs):
            x1 = inner.xs[i + 1] if i + 1 < len(inner.xs) else None
            if inner.b[i] == 0:
                continue
            for q in self.xs[1:]:
                x = (q - inner.a[i]) / inner.b[i]
                if x > x0 and (x1 is None or x < x1):
                    xs.add(x)
        pts = sorted(xs)
        a, b = [], []
        for j, x0 in enumerate(pts):
            x1 = pts[j + 1] if j + 1 < len(pts) else x0 + 2
            k = inner.piece(x0)
            ia, ib = inner.a[k], inner.b[k]
            q_mid = ia + ib * (x0 + x1) / 2
            # the outer piece the open interval maps into ("up_to" is inclusive: a quantity exactly
            # at a tier bound belongs to the lower tier, so pick by the interval's interior)
            m = self.piece(q_mid)
            a.append(self.a[m] + self.b[m] * ia)
            b.append(self.b[m] * ib)
        return PL(tuple(pts), tuple(a), tuple(b))


def _overage_pl(ov: Overage) -> PL:
    """The overage amount (picos) as a function of the overage quantity (tokens or picos)."""
    if ov.kind == "per_million":
        return PL.line(0, ov.rate_picos)
    if ov.kind == "rate_card":
        return PL.line(0, ov.multiplier)

    def rate(step: TierStep) -> Fraction:
        return Fraction(step.rate_picos) if ov.unit == "tokens" else Fraction(step.multiplier)

    xs, a, b = [_ZERO], [], []
    lower, acc = _ZERO, _ZERO
    for i, step in enumerate(ov.steps):
        r = rate(step)
        if i:
            xs.append(lower)
        if ov.mode == "volume":
            a.append(_ZERO)
            b.append(r)
        else:
            a.append(acc - r * lower)
            b.append(r)
        if step.up_to is None:
            break
        acc += r * (step.up_to - lower)
        lower = Fraction(step.up_to)
    return PL(tuple(xs), tuple(a), tuple(b))


@dataclass(frozen=True, slots=True)
class Mix:
    """A customer's usage shape: total tokens, total pay-per-token charge (picos), and the usage
    itself (to find each allowance's share under a plan)."""

    tokens: int
    charge: int
    usage: tuple[Usage, ...]


def mix_of(usage: Iterable[Usage]) -> Mix:
    items = tuple(usage)
    return Mix(sum(u.total_tokens() for u in items), sum(u.charge for u in items), items)


def payg_curve(mix: Mix) -> PL:
    """Pay-per-token: the mix's charge per token, times the volume."""
    if mix.tokens == 0:
        return PL.line(0, 0)
    return PL.line(0, Fraction(mix.charge, mix.tokens))


def plan_curve(plan: PlanVersion, mix: Mix) -> PL:
    """One full period of ``plan`` at volume ``v`` tokens of this mix (prepaid credit aside)."""
    per_allowance: dict[str, Fraction] = {}
    unmatched = _ZERO
    total = Fraction(mix.tokens) if mix.tokens else Fraction(1)
    for u in mix.usage:
        if plan.unit == "tokens":
            for cls in TOKEN_CLASSES:
                n = u.tokens.get(cls, 0)
                if n <= 0:
                    continue
                a = plan.allowance_for(u.provider, u.model, cls)
                if a is None:
                    unmatched += n
                else:
                    per_allowance[a.id] = per_allowance.get(a.id, _ZERO) + n
        else:
            a = plan.allowance_for(u.provider, u.model, None)
            if a is None:
                unmatched += u.charge
            else:
                per_allowance[a.id] = per_allowance.get(a.id, _ZERO) + u.charge
    qty = PL.line(0, unmatched / total)
    for a in plan.allowances:
        share = per_allowance.get(a.id, _ZERO) / total
        qty = qty + PL.line(-a.included, share).positive()
    over = _overage_pl(plan.overage).compose(qty)
    if plan.on_exhausted == "block":
        over = PL.line(0, 0)
    elif plan.on_exhausted == "cap" and plan.cap is not None:
        over = over.at_most(plan.cap)
    bill = over.plus(plan.fee)
    if plan.minimum_commitment is not None:
        bill = bill.at_least(plan.minimum_commitment)
    return bill


def crossings(f: PL, g: PL) -> list[Fraction]:
    """Volumes ``v > 0`` where ``f`` and ``g`` are equal or swap order (a jump across the other
    curve counts at the jump), ascending. A stretch where they coincide contributes its start."""
    h = f - g
    out: set[Fraction] = set()
    for i, x0 in enumerate(h.xs):
        x1 = h.xs[i + 1] if i + 1 < len(h.xs) else None
        a, b = h.a[i], h.b[i]
        if b == 0:
            if a == 0 and x0 > 0:
                out.add(x0)
        else:
            r = -a / b
            if r > 0 and r >= x0 and (x1 is None or r < x1):
                out.add(r)
        if i > 0 and x0 > 0:
            left = h.a[i - 1] + h.b[i - 1] * x0
            right = a + b * x0
            if left * right < 0:
                out.add(x0)
    return sorted(out)


def fraction_json(x: Fraction) -> dict[str, str | bool]:
    """``{"exact": "25000000/3", "tokens": "8333333.333333"}`` (tokens: truncated to 6 places)."""
    scaled = x.numerator * 10**6 // x.denominator
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**6)
    exact = str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return {"exact": exact, "tokens": f"{sign}{whole}.{frac:06d}", "terminates": _terminates(x.denominator)}


def _terminates(d: int) -> bool:
    """Whether 1/d has a finite decimal expansion (d = 2^i 5^j)."""
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def curve_points(f: PL, upto: Fraction) -> list[tuple[Fraction, Fraction]]:
    """(volume, picos) at every breakpoint up to ``upto`` (both sides of a jump), for charts."""
    pts: list[tuple[Fraction, Fraction]] = []
    for i, x in enumerate(f.xs):
        if x > upto:
            break
        if i > 0:
            pts.append((x, f.a[i - 1] + f.b[i - 1] * x))
        pts.append((x, f.a[i] + f.b[i] * x))
    pts.append((upto, f.at(upto)))
    return pts


def usage_volume(usage: Mapping[str, int]) -> int:
    return sum(usage.get(c, 0) for c in TOKEN_CLASSES)
