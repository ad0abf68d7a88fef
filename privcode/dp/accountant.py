"""Privacy accounting for DP-SGD with Poisson sampling (Opacus's accountants).

    python -c "from privcode.dp.accountant import epsilon; print(epsilon(256/19000, 0.8, 100, 1e-5))"

The reported ε is the PRV accountant's *upper bound* (Gopi et al. 2021); the RDP bound
(Mironov 2017) is reported beside it as a conservative cross-check. Both assume the
Poisson-subsampled Gaussian mechanism with one record as the privacy unit.
"""
from __future__ import annotations

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

EPS_ERROR = 0.01  # PRV discretization error budget on ε; the returned value is an upper bound
CALIBRATION_TOLERANCE = 0.01  # calibrated σ gives ε in [target - tol, target]


def _accountant(kind: str, history):
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[kind]()
    acc.history = [tuple(h) for h in history]
    return acc


def epsilon_from_history(history, delta: float, kind: str = "prv") -> float:
    """ε after the steps in `history` = [(noise_multiplier, sample_rate, steps), ...]."""
    if not history:
        return 0.0
    acc = _accountant(kind, history)
    if kind == "prv":
        return float(acc.get_epsilon(delta, eps_error=EPS_ERROR))
    return float(acc.get_epsilon(delta))


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float, kind: str = "prv") -> float:
    return epsilon_from_history([(noise_multiplier, sample_rate, steps)], delta, kind)


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "prv") -> float:
    """Smallest σ (within tolerance) whose ε after `steps` is ≤ target_epsilon."""
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant=kind, epsilon_tolerance=CALIBRATION_TOLERANCE,
                                 **({"eps_error": EPS_ERROR} if kind == "prv" else {}))
    return float(sigma)
