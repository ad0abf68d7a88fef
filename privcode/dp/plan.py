"""DP planning: the sampling rate, σ and the checks a DP run must pass before it starts.

    from privcode.dp.plan import plan
    p = plan(epsilon=4, delta=1e-5, steps=100, batch_size=256, dataset_size=19_500, n_records=19_437)
    p.sample_rate, p.noise_multiplier, p.size["assumption"]
    full = remaining(history, sigma=p.noise_multiplier, q=p.sample_rate, steps=100, start=30, delta=1e-5, epsilon=4)

The data set's size N. Under add/remove adjacency N differs between neighbouring data sets, so a
release that reveals N (or q = B/N, or σ calibrated at that q) is not covered by ε. The data owner
chooses (`privacy.dataset_size`):
- an integer N̂, a *declared* public size: q = batch_size / N̂ and the expected batch size is
  batch_size, all public constants; the true N is used only inside the private zone (the sampler
  draws each of the N records with probability q), and appears in no release;
- "public": the true N is declared public; q = batch_size / N, and privacy.json states the
  assumption and N.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from privcode.errors import PrivcodeError

log = logging.getLogger(__name__)
PUBLIC = "public"


@dataclass(frozen=True)
class Plan:
    sample_rate: float        # q
    noise_multiplier: float   # σ
    expected_batch_size: float  # the public divisor of the noisy sum
    planned_epsilon: float
    size: dict                # what privacy.json says about N


def size_assumption(dataset_size, n_records: int) -> tuple[int, dict]:
    """(N̂ used for q, the privacy.json fields stating the assumption)."""
    if dataset_size is None:
        raise PrivcodeError("DP training needs privacy.dataset_size: an integer (a declared public size N̂: "
                            "q = batch_size/N̂, the true N stays private) or \"public\" (the true N is released)",
                            field="dataset_size")
    if dataset_size == PUBLIC:
        return n_records, {"size": PUBLIC, "public_n": n_records,
                           "assumption": f"N = {n_records} records, declared public by the data owner"}
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise PrivcodeError(f"dataset_size must be a positive integer or \"public\", got {dataset_size!r}",
                            field="dataset_size")
    if not 0.5 * dataset_size <= n_records <= 2 * dataset_size:  # private-zone log only
        log.warning("the true N is far from the declared size %d: the expected batch differs from batch_size",
                    dataset_size)
    return dataset_size, {"size": "declared", "declared_size": dataset_size,
                          "assumption": f"q = batch_size / declared size {dataset_size}; the true N is not released"}


def plan(*, epsilon, delta, steps, batch_size, dataset_size, n_records: int, noise_multiplier=None,
         accountant: str = "prv", sampler: str = "poisson", lora_dropout: float = 0.0) -> Plan:
    """Refuse a run the accountant does not cover; else q, σ (calibrated to ε unless given) and ε."""
    from privcode.dp import accountant as acct

    if sampler != "poisson":
        raise PrivcodeError(f"sampler '{sampler}' is not covered by the accountant: only 'poisson' is")
    if epsilon is None or not epsilon > 0:
        raise PrivcodeError(f"DP training needs a target 'epsilon' > 0, got {epsilon!r}", field="epsilon")
    if not steps or steps < 1:
        raise PrivcodeError("DP training needs 'steps' ≥ 1 (the accountant's T)", field="steps")
    if lora_dropout:
        raise PrivcodeError("lora_dropout must be 0 under DP (per-record gradients must be deterministic)")
    n_hat, size = size_assumption(dataset_size, n_records)
    if delta is None or not (0 < delta < 1.0 / n_hat):
        raise PrivcodeError(f"'delta'={delta} must be in (0, 1/N) = (0, {1.0 / n_hat:.3g}) for N={n_hat}",
                            field="delta")
    q = batch_size / n_hat
    if not (0 < q <= 1):
        raise PrivcodeError(f"expected batch size {batch_size} must be in [1, N={n_hat}]", field="batch_size")
    sigma = noise_multiplier
    if sigma is None:
        sigma = acct.calibrate_sigma(epsilon, delta, q, steps, accountant)
    eps = acct.epsilon(q, sigma, steps, delta, accountant)
    if eps > epsilon * (1 + 1e-6):
        raise PrivcodeError(f"σ={sigma} gives ε={eps:.4f} > target {epsilon} after {steps} steps")
    return Plan(sample_rate=q, noise_multiplier=float(sigma), expected_batch_size=float(batch_size),
                planned_epsilon=eps, size=size)


def remaining(history, *, sigma: float, q: float, steps: int, start: int, delta: float, epsilon: float,
              accountant: str = "prv") -> list:
    """The accountant history of the whole run (`history`: the steps taken before `start`, e.g. by
    a resumed run; then σ and q up to `steps`); refused when its ε would pass the target. ε is
    monotone in the steps taken, so checking the whole remaining plan once (also after a resume,
    whose history may come from another σ or q) guards every step of the run."""
    from privcode.dp import accountant as acct

    full = history + [(sigma, q, steps - start)] if steps > start else history
    eps_full = acct.epsilon_from_history(full, delta, accountant)
    if eps_full > epsilon * (1 + 1e-6):
        raise PrivcodeError(f"finishing this run would spend ε={eps_full:.4f} > target {epsilon}; not starting")
    return full


def add_step(history: list, sigma: float, q: float) -> list:
    """`history` as (σ, q, steps) runs, after one more step at σ and q."""
    if history and history[-1][0] == sigma and history[-1][1] == q:
        return history[:-1] + [(sigma, q, history[-1][2] + 1)]
    return history + [(sigma, q, 1)]
