"""``mtrec-data``: synthetic Parquet files for ``data=files`` runs, and what a schema sees in a set of files.

Examples::

    mtrec-data synthetic --rows 10000000 --out data/clicks      # train/val/test Parquet + schema.yaml
    mtrec-train data=files data.train='data/clicks/train/*.parquet' data.val='data/clicks/val/*.parquet' \\
        data.test='data/clicks/test/*.parquet' data.schema=data/clicks/schema.yaml
    mtrec-data inspect --schema data/clicks/schema.yaml 'data/clicks/train/*.parquet'

The library side is :mod:`mtrec.data.filetools`. A user error (a glob matching nothing, a missing column, a type
unfit for its role, a corrupt file, a folder that is not empty) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from mtl.cli import ConfigErrorExit

PROGRAM = "mtrec-data"
_EXIT = ConfigErrorExit(PROGRAM)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="write a synthetic click log as Parquet files and its schema")
    syn.add_argument("--rows", type=int, required=True, help="train rows (val and test: a tenth as many each)")
    syn.add_argument("--out", required=True, help="a new (or empty) folder")
    syn.add_argument("--num-users", type=int, default=100_000)
    syn.add_argument("--num-items", type=int, default=50_000)
    syn.add_argument("--rows-per-file", type=int, default=1_000_000)
    syn.add_argument("--row-group-size", type=int, default=100_000)
    syn.add_argument("--seed", type=int, default=0)
    ins = sub.add_parser("inspect", help="files, row groups, rows and per-column types and nulls under a schema")
    ins.add_argument("--schema", required=True, help="the schema YAML file")
    ins.add_argument("globs", nargs="+", help="Parquet or CSV files (globs)")
    return parser


def _synthetic(args: argparse.Namespace) -> dict:
    from mtrec.data.filetools import write_synthetic

    return write_synthetic(
        args.out,
        args.rows,
        num_users=args.num_users,
        num_items=args.num_items,
        rows_per_file=args.rows_per_file,
        row_group_size=args.row_group_size,
        seed=args.seed,
    )


def _inspect(args: argparse.Namespace) -> dict:
    from mtrec.data.filetools import inspect_files

    return inspect_files(args.schema, args.globs)


def main(argv: Sequence[str] | None = None) -> None:
    """``mtrec-data`` (the console script): prints the result as JSON. User errors exit with status 2."""
    args = _parser().parse_args(argv)
    result = _EXIT.run(_synthetic if args.command == "synthetic" else _inspect, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
