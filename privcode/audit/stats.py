"""The statistics of a privacy audit: the one-run lower bound on ε, guesses, group privacy, exposure.

    >>> from privcode.audit.stats import eps_lower_bound, group_privacy, max_eps_lb
    >>> round(max_eps_lb(1000, 500, 1e-5), 2)   # the most an audit of 1000 canaries, 500 guesses can show
    5.09
    >>> eps_lower_bound(1000, 500, 250, 1e-5)   # half of the guesses right: nothing shown
    0.0
    >>> group_privacy(1.0, 1e-6, 1)             # one record per canary: the per-record guarantee
    (1.0, 1e-06)

One-run audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846): m canaries, each included independently with probability 1/2; the
auditor guesses "in"/"out" for r of them from scores alone. From v correct guesses `eps_lower_bound`
returns ε_lb such that, with confidence 1 − β, the run is not (ε, δ)-DP for any ε < ε_lb (`p_value`).
Exposure (Carlini et al. 2019, "The Secret Sharer"): the rank of a secret among random candidates
by the model's likelihood (`exposure_of`).
"""
from __future__ import annotations

import math

import numpy as np

REFERENCE = ("Steinke, Nasr & Jagielski, 'Privacy Auditing with One (1) Training Run', NeurIPS 2023 "
             "(arXiv:2305.08846), Theorem 5.2 / Algorithm 2")
EPS_MAX = 100.0  # search range of ε_lb; q = 1/(1+e^-ε) is 1.0 in float64 well before this


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ)-DP per record ⇒ (kε, k·e^{(k−1)ε}·δ)-DP for a group of k records (Dwork & Roth 2014, Lemma 2.2)."""
    if k == 1:
        return epsilon, delta
    if math.isinf(epsilon):
        return math.inf, delta
    try:
        d = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        d = 1.0
    return k * epsilon, min(1.0, d)


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on P[W ≥ v] when the trained model is (ε, δ)-DP w.r.t. each of the m canaries,
    each included independently with probability 1/2, and the auditor makes r guesses, W of them
    right (Theorem 5.2 of Steinke et al. 2023):

        P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v−i) − f(v)) / i,
        f(u) = P[Binomial(r, q) ≥ u],  q = e^ε / (1 + e^ε)

    (q is the accuracy of ε-DP randomized response; f(v−i) − f(v) = P[v−i ≤ Bin(r, q) < v], and the
    max over i > v is attained at i = v). Returned value is clipped to [0, 1]."""
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v} r={r} m={m}")
    if not eps >= 0:
        raise ValueError(f"need ε ≥ 0, got {eps}")
    if not (0 <= delta <= 1):
        raise ValueError(f"need 0 ≤ δ ≤ 1, got {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps)) if eps < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) ≥ v]
    alpha = 0.0
    if delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v−1], P[Bin = v−2], …, P[Bin = 0]
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))  # max_i P[v−i ≤ Bin < v] / i
    p = tail + 2.0 * m * delta * alpha
    return min(1.0, max(0.0, p)) if math.isfinite(p) else 1.0


def eps_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6) -> float:
    """ε_lb: the smallest ε at which `p_value` reaches β (0 if it does at ε = 0).

    For every ε < ε_lb the observation (v of r guesses right) had probability < β under (ε, δ)-DP,
    so "the run is not (ε_lb', δ)-DP for any ε_lb' < ε_lb" holds with confidence 1 − β. Taking the
    first crossing (a scan on a 0.05 grid, then bisection to `tol`) rather than a plain bisection
    keeps this true even where p_value is not monotone in ε. Never NaN; at most EPS_MAX."""
    if not (0 < beta < 1):
        raise ValueError(f"need 0 < β < 1, got {beta}")
    if r == 0 or v == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        if not (0 <= v <= r <= m):
            raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v} r={r} m={m}")
        return 0.0
    lo, hi, step = 0.0, None, 0.05
    e = step
    while e <= EPS_MAX:
        if p_value(m, r, v, e, delta) >= beta:
            hi = e
            break
        lo = e
        e = round(e + step, 10)
    if hi is None:
        return EPS_MAX
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_eps_lb(m: int, r: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """The highest ε_lb that an audit of m canaries and r guesses can report: all r guesses right.
    A claim ε at or above it can never be refuted by that design."""
    return eps_lower_bound(m, r, r, delta, beta)


def eps_json(x):
    """ε for JSON: "inf" for infinity."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def audit_power(m: int, r: int, claim: float, delta: float, beta: float) -> dict:
    """Whether a design of m canaries and r guesses can refute the claim ε at all (`max_eps_lb`)."""
    top = max_eps_lb(m, r, delta, beta)
    return {"eps_lb_max": top, "claim": eps_json(claim), "can_refute": bool(top > claim), "m": m, "guesses": r,
            "delta": delta, "beta": beta,
            "note": f"the highest ε_lb this design can report (all {r} guesses right) is {top:.3f}"}


def guesses_from_scores(scores, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 (in) for the k_pos highest scores, −1 (out) for the k_neg lowest, 0 (abstain) otherwise.
    Ties are broken by index, so the guesses are a deterministic function of the scores."""
    s = np.asarray(scores, dtype=float)
    m = len(s)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg ≥ 0 and k_pos + k_neg ≤ m = {m}, got {k_pos}, {k_neg}")
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="stable")
    g = np.zeros(m, dtype=int)
    g[order[:k_pos]] = 1
    if k_neg:
        g[order[m - k_neg:]] = -1
    return g


def audit_counts(guesses, included) -> dict:
    g = np.asarray(guesses, dtype=int)
    s = np.where(np.asarray(included, dtype=bool), 1, -1)
    return {"guesses": int(np.sum(g != 0)), "correct": int(np.sum(g * s == 1)),
            "guesses_in": int(np.sum(g == 1)), "correct_in": int(np.sum((g == 1) & (s == 1))),
            "guesses_out": int(np.sum(g == -1)), "correct_out": int(np.sum((g == -1) & (s == -1)))}


def exposure_of(nll, extrapolate: bool = True) -> dict:
    """Exposure of a secret from the negative log-likelihoods of n candidates, the true secret's first:
    `exposure` = log2 n − log2 rank (ties ranked above the secret: conservative), i.e. Carlini's
    log2|R| − log2 rank with the rank in R estimated from n uniform draws, at most log2 n; and
    `exposure_extrapolated` (Carlini et al. §4.3, `extrapolated_exposure`), which can exceed it."""
    nll = np.asarray(nll, dtype=float)
    true, n = float(nll[0]), len(nll)
    rank = 1 + int(np.sum(nll[1:] <= true))
    out = {"rank": rank, "n_candidates": n, "exposure": math.log2(n) - math.log2(rank), "nll": true}
    if extrapolate:
        out["exposure_extrapolated"] = extrapolated_exposure(nll[1:], true)
    return out


def extrapolated_exposure(others, true) -> float | None:
    """−log2 P_{t∼R}[nll(t) ≤ nll(secret)] with the other candidates' nll fitted by a skew-normal;
    None where there are fewer than 10 of them, they are all equal, or the fit fails."""
    from scipy.stats import skewnorm

    x = np.asarray(others, dtype=float)
    if len(x) < 10 or float(np.std(x)) == 0.0:
        return None
    try:
        a, loc, scale = skewnorm.fit(x)
        lc = float(skewnorm.logcdf(true, a, loc, scale))
    except Exception:  # a failed fit is reported as missing, never as a number
        return None
    if not math.isfinite(lc):
        return None
    return max(0.0, -lc / math.log(2))
