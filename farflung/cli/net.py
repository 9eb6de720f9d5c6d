"""``farflung netlab`` and ``farflung probe``: the network lab from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from farflung.config import ConfigError
from farflung.netlab.probe_args import add_probe_args
from farflung.train.contract import EXIT_USAGE


def cmd_netlab(args: argparse.Namespace) -> int:
    from farflung.netlab import Lab, available, list_labs, netlab_down

    if args.action == "status":
        labs = list_labs()
        if not labs:
            print("no farflung network lab on this machine")
        for lab in labs:
            owner = (
                "owner running" if lab["owner_alive"] else "left behind (netlab down removes it)"
            )
            print(
                f"{lab['prefix']}: {lab['hosts']} host(s), "
                f"{len(lab['namespaces'])} namespaces, {owner}"
            )
        return 0
    if args.action == "down":
        removed = netlab_down(force=args.force)
        print(
            f"removed {len(removed)} namespace(s) left by earlier farflung labs"
            + (": " + ", ".join(removed) if removed else "")
        )
        return 0
    if args.action == "check":
        ok, reason = available()
        print("the network lab works here" if ok else f"the network lab is unavailable: {reason}")
        return 0 if ok else 1
    if args.spec is None:
        raise ConfigError("netlab up needs a link SPEC (e.g. 100mbit,20ms or regional)")
    ok, reason = available()
    if not ok:
        print(f"farflung: the network lab is unavailable: {reason}", file=sys.stderr)
        return EXIT_USAGE
    from farflung.train.network import parse_link_spec

    matrix = parse_link_spec(args.spec, args.hosts)
    with Lab(matrix) as lab:
        print(f"network lab up: {matrix.n} hosts, {args.spec}")
        print(matrix.describe())
        for i in range(matrix.n):
            print(f"  host {i}: {lab.address(i)}  run inside: {' '.join(lab.exec_prefix(i))} CMD")
        print(
            "one-way delay is not applied by tc (no netem); farflung's own workers add it "
            "in-process. Ctrl+C tears the lab down.",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while args.seconds is None or args.seconds > 0:
                time.sleep(0.5 if args.seconds is None else min(0.5, args.seconds))
                if args.seconds is not None:
                    args.seconds -= 0.5
        except KeyboardInterrupt:
            pass
    print("network lab torn down")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from farflung.train.launch import launch_local
    from farflung.train.network import network

    if args.workers < 2:
        raise ConfigError("probe needs --workers 2 or more")
    with (
        tempfile.TemporaryDirectory() as tmp,
        network(args.netlab, args.link_model, args.workers, Path(tmp)) as placement,
    ):
        if placement.description != "unshaped":
            print(f"farflung: network {placement.description}", file=sys.stderr)
        return launch_local(
            ["--out", str(Path(args.out).resolve()), "--seconds", str(args.seconds)],
            args.workers,
            module="farflung.netlab.probe",
            placement=placement,
        )


def add_parsers(sub: argparse._SubParsersAction, add_network_args) -> None:
    n = sub.add_parser("netlab", help="emulated slow links on this machine (root, Linux)")
    n.add_argument(
        "action",
        choices=["up", "down", "check", "status"],
        help="up: create a lab and keep it until Ctrl+C; down: remove leftovers "
        "of crashed farflung labs; check: can the lab run here? status: the labs present",
    )
    n.add_argument("spec", nargs="?", help="BANDWIDTH[,DELAY], a scenario or a matrix file")
    n.add_argument("--hosts", type=int, default=2, help="emulated hosts (for up)")
    n.add_argument("--seconds", type=float, help="tear down after this long (for up)")
    n.add_argument(
        "--force",
        action="store_true",
        help="down: also remove labs whose owning process still runs",
    )
    n.set_defaults(func=cmd_netlab)

    p = sub.add_parser("probe", help="measure bandwidth and latency between workers")
    p.add_argument("--workers", type=int, default=2)
    add_probe_args(p)
    add_network_args(p)
    p.set_defaults(func=cmd_probe)
