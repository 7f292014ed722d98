"""``python -m semi_lab cell NAME -o OUT`` (``PYTHONPATH=benchmarks``): one cell of the table, start to finish;
``--list`` prints the table. ``benchmarks/scripts/run_cell.sh`` installs the offline wheels first and runs this."""

from __future__ import annotations

import argparse
import sys

from nnunet_semi.errors import SemiInputError


def cell_entry(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m semi_lab cell",
                                     description="one named cell of the cell table, start to finish")
    parser.add_argument("name", nargs="?", help="the cell (--list: the table)")
    parser.add_argument("-o", help="output folder: the results tables and <cell>.tar.gz with everything")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start by which everything is in -o (default: the cell's; 0: none)")
    parser.add_argument("--data", default=None, help="the raw dataset folder (default: data/<dataset> in the checkout)")
    parser.add_argument("--work", default=None, help="work folder (default: $TMPDIR/nnunet_semi_cells/<cell>)")
    parser.add_argument("--started", type=float, default=None,
                        help="time.time() when the command began (run_cell.sh passes it: the install counts)")
    parser.add_argument("--list", action="store_true", help="print the cell table")
    args = parser.parse_args(argv)
    from semi_lab.cells import cell_table_markdown, run_cell

    if args.list:
        print(cell_table_markdown())
        return
    if args.name is None or args.o is None:
        raise SemiInputError("give a cell name and -o OUT_DIR (--list: the cells).")
    run_cell(args.name, args.o, args.deadline, args.data, args.work, args.started)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "cell":
        print("usage: python -m semi_lab cell NAME -o OUT [--deadline S] [--data DIR] [--work DIR] | cell --list",
              file=sys.stderr)
        sys.exit(2)
    try:
        cell_entry(argv[1:])
    except SemiInputError as error:
        print(f"semi_lab cell: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
