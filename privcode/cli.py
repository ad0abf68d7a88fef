"""The `privcode` command: one subcommand per pipeline stage (each Snakemake rule calls one).

    privcode --help
    privcode <stage> --help
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from privcode.errors import PrivcodeError

# subcommand -> (module, or module:function where it is not `main`; one-line help)
COMMANDS = {
    "build-model": ("privcode.build_model", "convert/build a base model into a local HF directory"),
    "make-data": ("privcode.data.taskgen", "generate the demo's templated tasks and benchmark"),
    "prepare-data": ("privcode.data.records", "load, validate and split private/public data"),
    "dp-finetune": ("privcode.train", "stage 1: LoRA DP-SGD fine-tuning (Opacus)"),
    "merge": ("privcode.merge", "stage 2: merge a LoRA adapter into its base"),
    "generate": ("privcode.synth.generate", "stage 3: answer public prompts with the DP model"),
    "exec-filter": ("privcode.filters.exec_filter", "stage 4: keep programs that run cleanly in a sandbox"),
    "skip-exec-filter": ("privcode.filters.passthrough", "ablation: keep every generated program with code, unrun"),
    "roundtrip-filter": ("privcode.filters.roundtrip", "stage 5: keep programs whose description matches the prompt"),
    "finetune": ("privcode.train", "stage 6: ordinary fine-tuning (utility boosting, NonDPFT)"),
    "evaluate": ("privcode.evaluate.run", "stage 7: EvalPlus / OpenAI HumanEval / BigCodeBench pass@1"),
    "table3": ("privcode.report.table3", "stage 8: results/table3.csv (ε from privacy.json)"),
    "compare": ("privcode.report.compare", "results/compare.csv: PrivCode vs DPFT and PreCode, paired per problem"),
    "audit": ("privcode.audit.run", "empirical privacy audit: canaries, exposure, one-run ε lower bound"),
    "mask-pii": ("privcode.data.mask", "JFT: replace detected PII in the private records by placeholders"),
    "inject-canaries": ("privcode.data.canaries", "put PII canaries (k copies each) into the private data"),
    "leakage": ("privcode.evaluate.leakage", "table 4: canary leakage, exposure and PII in a model's outputs"),
    "vuln": ("privcode.evaluate.vuln", "vulnerability rate of generated code (Bandit; CodeQL if installed)"),
    "table4": ("privcode.report.table4", "results/table4.csv: leakage per model/method (ε from privacy.json)"),
    "vulntable": ("privcode.report.table4:vuln_main", "results/vuln.csv: safe rate per model/method"),
    "table5": ("privcode.report.table5", "results/table5.csv: sensitivity sweeps (PARAM=VALUE:EVAL_DIR)"),
    "rethreshold": ("privcode.filters.threshold", "re-apply round-trip τ without regenerating"),
    "figures": ("privcode.report.figures", "privacy–utility and synthesis-funnel PNGs"),
    "gpu-run": ("privcode.gpus", "run a command on GPUs no other running job holds (CUDA_VISIBLE_DEVICES)"),
    "release": ("privcode.release", "copy DP artifacts out with a certificate of the total ε"),
    "status": ("privcode.status", "what a results tree holds: ε per artifact, funnel counts, pass@1"),
    "budget": ("privcode.budget", "ε spent and released per private data set (the budget registry)"),
    "bench": ("privcode.bench", "benchmarks: exec | train | generate | attention | pipeline | zero"),
}
# keyword arguments of a subcommand's function
KWARGS = {"dp-finetune": {"dp": True}, "finetune": {"dp": False}}


def _usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: privcode <command> [options]", "", "commands:"]
    lines += [f"  {k:<{w}}  {help_}" for k, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)
TRAINING = ("dp-finetune", "finetune")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from privcode import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"privcode: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod, _, fn = COMMANDS[cmd][0].partition(":")
    if cmd in TRAINING:  # rows of many lengths: grow memory segments instead of fragmenting them
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        rc = getattr(importlib.import_module(mod), fn or "main")(rest, **KWARGS.get(cmd, {}))
    except PrivcodeError as e:
        print(f"privcode {cmd}: error: {e}", file=sys.stderr)
        return 2
    return rc if type(rc) is int else 0  # a stage's own exit status (e.g. exec-filter's refusal)


if __name__ == "__main__":
    sys.exit(main())
