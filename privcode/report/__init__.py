"""Tables and figures. Shared here: the order of methods in every table, the CSV writer and the
command line of a table built from artifact directories."""
from __future__ import annotations

METHOD_ORDER = ["PreCode", "NonDPFT", "DPFT", "JFT", "PrivCode"]


def note_of(priv: dict) -> str:
    """The plain-words caveats of an artifact's privacy.json (its `notes`), for a table's note
    column: e.g. selective DP only (JFT), not a DP release (reproducible seed)."""
    return "; ".join(priv.get("notes", []))


def sort_rows(df):
    """Rows by model, then method in METHOD_ORDER (unknown methods last), then ε."""
    df = df.assign(_m=df["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER)))
    return df.sort_values(["model", "_m", "epsilon"], kind="stable").drop(columns="_m").reset_index(drop=True)


def write_csv(df, out) -> None:
    """Write a table atomically (4 significant digits) and print it."""
    from privcode.io import atomic_file

    with atomic_file(out) as fh:
        df.to_csv(fh, index=False, float_format="%.4g")
    print(df.to_string(index=False))


def table_main(argv, *, prog: str, doc: str, dirs: str, build) -> None:
    """`prog --out CSV DIR...`: write_csv(build(DIRs), CSV)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(dirs, nargs="+")
    a = ap.parse_args(argv)
    write_csv(build(getattr(a, dirs)), a.out)
