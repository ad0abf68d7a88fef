"""The round trip's optional early stop: describe in rounds, stop once a description passes τ_s.

    privcode roundtrip-filter --model M --input exec/kept.jsonl --out roundtrip-scores \
        --params '{"n": 20, "early_stop_round": 5, "early_stop_threshold": 0.92, "threshold": 0.0, ...}'

With `early_stop_round: k` (> 0) a program gets its `n` descriptions k at a time (⌈n/k⌉ rounds, the
last one shorter), or with a list such as `[5, 15]` in rounds of those sizes (they sum to n); each
round is scored at once, and a program whose best F1 so far is ≥ τ_s (`early_stop_threshold`,
default `threshold`) gets no more rounds. Off by default (`k = 0`). Each round prefills its
program's prompt again, so few rounds that grow ([5, 15]) can cost less GPU time than many even
ones, though they make more descriptions (`privcode bench pipeline` projects both).

Why the keep decision at τ_s has the same distribution as with all n: the n descriptions of a
program are i.i.d. draws given the program (same prompt, same sampling settings, fresh random
streams per round), and the decision is "max F1 over the n ≥ τ_s". The stopping rule decides only
*whether* to draw more, never *what* is drawn, so the descriptions made are distributed as the first
m of n i.i.d. draws; coupling them with a full run's first m draws, the early run stops only when
one of them is ≥ τ_s (the full run then keeps the program too) and otherwise draws all n (the same
max). The decision is identical draw by draw, hence in distribution.

What it means for the τ sweep (`privcode rethreshold`, `apply_threshold`):
  * τ' ≤ τ_s is exact: a program that stopped has a description ≥ τ_s ≥ τ' (kept in both runs); one
    that did not stop has all n descriptions.
  * τ' > τ_s needs the full n for a program that stopped early with best F1 < τ': a later
    description might have reached τ'. `check_threshold` refuses such a τ' with one error (a stopped
    program whose best is already ≥ τ' is still decided exactly). The workflow passes
    τ_s = max(τ, sweeps.tau), so its own sweep never hits this.
  * `best`/`score` of a stopped program is the best of the descriptions made (≤ the best of n), so
    best-score means and medians are lower than with all n; only the keep decisions are exact.

Outputs: each scores.jsonl record of such a run holds `early_stop_threshold` and `stopped_after`
(descriptions made, when fewer than n; null when all n were made); stats.json has `early_stop`.
"""
from __future__ import annotations

import math

from privcode.errors import PrivcodeError

# round r samples with seed + r * ROUND_SEED_STRIDE, program i of the input from its stream i in it
# (privcode.synth.calls): no (seed, program) pair is drawn twice in a run, whatever the chunks
ROUND_SEED_STRIDE = 1 << 32


def round_sizes(n: int, k) -> list[int]:
    """Descriptions per round: an int k gives ⌈n/k⌉ rounds of k, the last one shorter (k = 0: one round
    of n); a list is the sizes themselves (each ≥ 1, summing to n; ValueError otherwise)."""
    if isinstance(k, (list, tuple)):
        sizes = list(k)
        if not sizes or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in sizes) \
                or sum(sizes) != n:
            raise ValueError(f"round sizes {sizes} must be integers >= 1 that sum to n={n}")
        return sizes
    if k <= 0 or k >= n:
        return [n]
    return [k] * (n // k) + ([n % k] if n % k else [])


def schedule_name(n: int, k) -> str:
    """'rounds of 5' / '5+15': how a schedule reads in tables."""
    sizes = round_sizes(n, k)
    if len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]:
        return f"rounds of {sizes[0]}" if len(sizes) > 1 else f"one round of {n}"
    return "+".join(map(str, sizes))


def describe_in_rounds(todo, n: int, k, tau: float, chunk: int, seed: int, describe, score, done) -> int:
    """Describe the programs of `todo` ([(index, record)]) in rounds, `chunk` programs at a time.

    `describe(part, m, seed)` → m texts per record of `part` ([(index, record)]: the index is the
    record's random stream, the seed is `seed` + round * ROUND_SEED_STRIDE); `score(records, texts)` → one F1 list per
    record (None for an answer that is no valid description); `done(record, texts, f1s, stopped_after)`
    is called once per program when it is finished (a killed run loses at most one chunk). Returns
    the number of descriptions made."""
    made = 0
    sizes = round_sizes(n, k)
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        texts: dict = {i: [] for i, _ in part}
        f1s: dict = {i: [] for i, _ in part}
        active = list(part)
        for r, m in enumerate(sizes):
            new = describe(active, m, seed + r * ROUND_SEED_STRIDE)
            got = score([rec for _, rec in active], new)
            still = []
            for (i, rec), t, f in zip(active, new, got):
                texts[i] += t
                f1s[i] += f
                made += len(t)
                if max((x for x in f1s[i] if x is not None), default=-math.inf) >= tau:
                    if len(texts[i]) < n:
                        done(rec, texts[i], f1s[i], len(texts[i]))
                        continue
                still.append((i, rec))
            active = still
            if not active:
                break
        for i, rec in active:  # all n made (passed in the last round, or never)
            done(rec, texts[i], f1s[i], None)
    return made


def check_threshold(records, tau: float, path) -> None:
    """Refuse τ when some program of an early-stop run stopped with best F1 < τ (its decision needs
    the descriptions it never got); τ ≤ the run's τ_s is always exact."""
    unknown = [r for r in records if r.get("stopped_after") is not None and tau > r["early_stop_threshold"]
               and (r["best"] is None or r["best"]["f1"] < tau)]
    if unknown:
        r = unknown[0]
        raise PrivcodeError(
            f"τ={tau} is above this run's early-stop τ_s={r['early_stop_threshold']}: {len(unknown)} program(s) "
            f"(e.g. '{r['id']}', {r['stopped_after']} description(s) made) stopped describing with best F1 < τ, "
            f"and deciding them at τ needs all their descriptions; re-run the round trip with "
            f"early_stop_threshold ≥ {tau} (or early_stop_round 0)", path=path)


# --- what it saves (privcode bench pipeline) -------------------------------------------------------
def rounds_needed(rec: dict, tau: float, n: int, k) -> int:
    """Rounds an early stop at τ_s=`tau` with the schedule `k` would have run for one scores.jsonl
    record of a run with all n (its valid F1s by description index)."""
    sizes = round_sizes(n, k)
    hits = [v["index"] for v in rec["valid"] if v["f1"] >= tau]
    if not hits:
        return len(sizes)
    first, made = min(hits), 0
    for r, m in enumerate(sizes):
        made += m
        if first < made:
            return r + 1
    return len(sizes)


def descriptions_needed(rec: dict, tau: float, n: int, k) -> int:
    """Descriptions an early stop at τ_s=`tau` with the schedule `k` would have made for one
    scores.jsonl record of a run with all n."""
    return sum(round_sizes(n, k)[:rounds_needed(rec, tau, n, k)])


def reach_probabilities(n: int, k, keep: float, p: float) -> list[float]:
    """Chance that a program gets round r of the schedule `k`, under a model: a share `keep` of programs
    pass τ_s (with all n), and for those the first passing description is geometric with
    per-description probability p (conditioned on passing within n); the others get every round."""
    sizes = round_sizes(n, k)
    if keep <= 0 or p <= 0:
        return [1.0] * len(sizes)
    z = 1 - (1 - p) ** n
    out, made = [], 0
    for m in sizes:  # reach round r: no pass among the first `made` descriptions
        out.append((1 - keep) + keep * ((1 - p) ** made - (1 - p) ** n) / z)
        made += m
    return out


def fit_pass_p(firsts, n: int) -> float:
    """The per-description pass chance p of `reach_probabilities`' model that best explains measured first
    passes: `firsts` holds, per program, the index (0..n-1) of its first description at or above τ, None where
    none passes; the programs that pass fix p by maximum likelihood of a geometric first pass conditioned on a
    pass within n (its mean matched; 0 where no program passes, ~0 where passes are no earlier than uniform)."""
    xs = [f for f in firsts if f is not None]
    if not xs:
        return 0.0
    mean = sum(xs) / len(xs)

    def excess(p):  # E[index | a pass within n] - mean: falls from (n-1)/2 - mean (p -> 0) to -mean (p = 1)
        q = 1 - p
        return q / p - n * q ** n / (1 - q ** n) - mean
    lo, hi = 1e-9, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def mean_descriptions(n: int, k, reach: list[float]) -> float:
    """Descriptions per program of the schedule `k` when round r is reached by a share reach[r]."""
    return sum(q * m for q, m in zip(reach, round_sizes(n, k)))


def expected_descriptions(n: int, k, keep: float, p: float) -> float:
    """Expected descriptions per program under the model of `reach_probabilities`."""
    return mean_descriptions(n, k, reach_probabilities(n, k, keep, p))
