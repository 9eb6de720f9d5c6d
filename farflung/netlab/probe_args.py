"""The probe's command-line options, apart from :mod:`farflung.netlab.probe` (which
imports torch) so that ``farflung``'s parser is built without it."""

from __future__ import annotations

import argparse


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """The probe's options, shared by its worker entry and ``farflung probe``."""
    p.add_argument("--out", default="links.json", help="matrix file to write (rank 0)")
    p.add_argument(
        "--seconds",
        type=float,
        default=0.3,
        help="aim for transfers of about this long per measurement",
    )
