"""Empirical privacy audits. The package sits above training (it trains the audited run) and below
nothing: the leakage measurement (privcode.evaluate.leakage) uses its public scoring functions.

    privcode audit --model results/models/tiny/base --data results/data/private/records.jsonl \
        --out results/audit/tiny/eps4 --params '{"epsilon": 4, "canaries": 1000}'

- privcode.audit.stats: the one-run ε lower bound (p-value, ε_lb and its maximum), guesses, group
  privacy, exposure from candidate likelihoods -- statistics only, no model.
- privcode.audit.scoring: a model's likelihoods of canary answers, exposure, verbatim leakage, scores.
- privcode.audit.run: the audit run (`privcode audit`): train with the canaries, score, write audit.json.
The canaries themselves are data: privcode.data.canaries.
"""
