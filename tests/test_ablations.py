"""#18 item 4: the official code's ablations as Table 5 rows (sweeps.ablations) — the rows a dry run
plans and the runs they need, the constant-λ and λ = 0 schedules those runs get, and the stand-in
for the execution filter that keeps every program without running it."""
import json
import re

import pytest
import yaml

from conftest import REPO
from privcode import ledger
from privcode.dp.engine import privsa_lambda
from privcode.filters import passthrough
from privcode.io import read_json, read_jsonl, write_jsonl
from privcode.train import TrainConfig
from test_workflow import jobs, snakemake

ALL = ["no_privsa", "constant_lambda", "no_exec_filter", "no_roundtrip", "no_filters"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """`snakemake -n -p` of the demo config with every ablation on."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert cfg["sweeps"]["ablations"] == []  # off by default
    cfg["sweeps"]["ablations"] = ALL
    path = tmp_path_factory.mktemp("abl") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, snakemake("-n", "-p", "--forceall", "results/table5.csv", "--configfile", str(path))


def test_dry_run_plans_one_table5_row_per_ablation(plan):
    cfg, out = plan
    j = jobs(out)
    # DP runs: PrivCode's, constant λ's and no_privsa's plain DP-SGD run of the junior (in a Table 3 run
    # the same as DPFT's, junior = premium here); noexec: one unfiltered set and its round trip
    assert j["dp_finetune"] == 3 and j["generate"] == 3 and j["exec_filter"] == 3
    assert j["skip_exec_filter"] == j["roundtrip_filter_noexec"] == j["roundtrip_threshold_noexec"] == 1
    assert j["finetune"] == 1 + 1 + 5 and j["table5"] == 1  # main, τ', ablations
    assert j["evaluate"] == (1 + 1 + 5) * len(cfg["evaluate"]["benchmarks"])  # each on every benchmark
    rows = re.search(r"privcode table5 --out results/table5.csv (.*?) >", out).group(1).split()
    abl = {r.split(":")[0]: r.split(":")[1] for r in rows if r.startswith("ablation=") and r.endswith("/humaneval")}
    assert abl == {"ablation=none": "results/eval/smollm2/PrivCode/eps4/humaneval",
                   **{f"ablation={a}": f"results/eval/smollm2/PrivCode/eps4-{a}/humaneval" for a in ALL}}
    # what each ablation's premium model is fine-tuned on
    data = dict((t, d) for d, t in re.findall(r"(?<!dp-)finetune --model \S+ --data (\S+) "
                                              r"--out results/ft/smollm2/PrivCode/(\S+)/adapter", out))
    s = "results/synth/smollm2"
    assert data == {"eps4": f"{s}/privsa/eps4/roundtrip/kept.jsonl",
                    "eps4-tau0.55": f"{s}/privsa/eps4/roundtrip-tau0.55/kept.jsonl",
                    "eps4-no_privsa": f"{s}/dpsgd/eps4/roundtrip/kept.jsonl",
                    "eps4-constant_lambda": f"{s}/privsa-const/eps4/roundtrip/kept.jsonl",
                    "eps4-no_exec_filter": f"{s}/privsa/eps4/noexec-roundtrip/kept.jsonl",
                    "eps4-no_roundtrip": f"{s}/privsa/eps4/exec/kept.jsonl",
                    "eps4-no_filters": f"{s}/privsa/eps4/noexec/kept.jsonl"}
    # the unfiltered set is never executed: the round trip of no_exec_filter reads it directly
    assert f"skip-exec-filter --input {s}/privsa/eps4/generated/samples.jsonl --out {s}/privsa/eps4/noexec" in out
    assert re.search(rf"roundtrip-filter --model \S+ --input {s}/privsa/eps4/noexec/kept.jsonl "
                     rf"--out {s}/privsa/eps4/noexec-roundtrip-scores", out)


def test_constant_lambda_and_no_privsa_runs_get_the_schedules_they_name(plan):
    """The DP runs' own --params, read into TrainConfig, give λ(t) = λmax at every step (constant_lambda),
    λ = 0 (no_privsa: PrivSA off, plain DP-SGD) and the decaying λ(t) of PrivCode itself."""
    cfg, out = plan
    runs = {m.group(1): TrainConfig(**json.loads(m.group(2))) for m in re.finditer(
        r"dp-finetune --model \S+ --data \S+ --out results/dp/smollm2/(\S+?)/eps4/adapter --private-dir \S+ "
        r"--params '(\{.*?\})'", out)}
    assert sorted(runs) == ["dpsgd", "privsa", "privsa-const"]

    def schedule(c):
        return [privsa_lambda(t, c.privsa_lambda_max, c.privsa_lambda_min, c.privsa_alpha, c.privsa_interval)
                for t in range(500)]

    lam_max = cfg["privsa"]["lambda_max"]
    const, main, plain = runs["privsa-const"], runs["privsa"], runs["dpsgd"]
    assert set(schedule(const)) == {lam_max} and const.privsa_lambda_max == lam_max
    decay = schedule(main)
    assert decay[0] == lam_max and decay[-1] < lam_max / 10 and decay == sorted(decay, reverse=True)
    assert plain.privsa_lambda_max == plain.privsa_lambda_min == 0.0 and set(schedule(plain)) == {0.0}
    # the three runs differ in the PrivSA term only
    strip = ("privsa_lambda_max", "privsa_lambda_min", "privsa_alpha", "privsa_interval")
    assert {k: v for k, v in vars(const).items() if k not in strip} == \
        {k: v for k, v in vars(main).items() if k not in strip} == {k: v for k, v in vars(plain).items() if k not in strip}


SAMPLES = [  # what the exec filter would drop (syntax error, endless loop) is kept: nothing runs
    {"id": "good", "problem": "Print 3.", "lang": "python", "raw": "```python\nprint(1 + 2)\n```"},
    {"id": "syntax", "problem": "Broken.", "lang": "python", "raw": "```python\ndef f(:\n    return 1\n```"},
    {"id": "loop", "problem": "Spin.", "lang": "python", "raw": "```python\nwhile True:\n    pass\n```"},
    {"id": "prose", "problem": "Explain.", "lang": "python", "raw": "I am sorry, I cannot write that program."},
    {"id": 7, "problem": "Greet.", "lang": "bash", "raw": "```bash\necho hello\n```"},
]


def test_the_skipped_exec_filter_keeps_every_program_with_code_unrun(tmp_path):
    gen = tmp_path / "generated"
    write_jsonl(gen / "samples.jsonl", SAMPLES)
    ledger.derive(gen, stage="generate")
    out = tmp_path / "noexec"
    stats = passthrough.run(gen / "samples.jsonl", out)
    kept = read_jsonl(out / "kept.jsonl")
    assert [k["id"] for k in kept] == ["good", "syntax", "loop", 7]
    # the exec filter's kept.jsonl format, which the round trip and the fine-tune read
    assert kept[0] == {"id": "good", "problem": "Print 3.", "solution": "```python\nprint(1 + 2)\n```",
                       "code": "print(1 + 2)\n", "lang": "python"}
    assert kept[2]["code"] == "while True:\n    pass\n" and kept[3]["lang"] == "shell"
    assert [(d["id"], d["reason"]) for d in read_jsonl(out / "dropped.jsonl")] == [("prose", "no_code")]
    assert read_json(out / "stats.json") == stats and (stats["n_input"], stats["n_kept"]) == (5, 4)
    rec = ledger.read(out)
    assert rec["stage"] == passthrough.STAGE and rec["epsilon"] == 0.0 and rec["parents"]
