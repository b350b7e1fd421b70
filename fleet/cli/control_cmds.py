"""`fleet bench control`: N realtime robots' loop rates, jitter and missed periods (fleet/bench/control.py).

Registered by fleet/cli/__init__.py (`register`); numpy and the simulators only, no torch unless --server.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fleet.cli.options import JsonOpt, OutOpt, fail, show


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("control")
    def bench_control(
        robots: Annotated[int, typer.Option("--robots", help="Realtime robots to run on this machine.")] = 4,
        seconds: Annotated[float, typer.Option("--seconds", help="How long to run them (wall clock).")] = 10.0,
        embodiment: Annotated[
            str, typer.Option("--embodiment", help="Body of every robot (franka: 1 kHz).")
        ] = "franka",
        procs: Annotated[
            int | None,
            typer.Option("--procs", help="Processes for the robots (default: one per core; 1 with --server)."),
        ] = None,
        latency_ms: Annotated[
            float, typer.Option("--policy-latency-ms", help="The synthetic policy's reply latency.")
        ] = 30.0,
        server: Annotated[
            bool, typer.Option("--server", help="Serve the shipped policy in a subprocess on the same cores instead.")
        ] = False,
        rt_priority: Annotated[
            int, typer.Option("--rt-priority", help="SCHED_FIFO priority of the control threads (0: normal).")
        ] = 50,
        json_out: JsonOpt = False,
        out: OutOpt = None,
    ) -> None:
        """Run N realtime robots (camera 30 Hz, proprio 100 Hz, policy at the body's rate, controller at its
        command rate) and print per loop the achieved rate, p50/p99 period jitter and missed periods, the
        camera-frame-to-command latency, the controller tick's cost and the safety violations (must be 0).

        Example: fleet bench control --robots 16 --seconds 10 --json --out runs/bench-control
        """
        from fleet.bench.control import format_table, run_control_bench, write_outputs

        if robots < 1 or seconds <= 0 or (procs is not None and procs < 1) or not 0 <= rt_priority <= 99:
            fail("--robots and --procs: expected positive ints; --seconds > 0; --rt-priority in [0, 99]")
        try:
            result = run_control_bench(
                robots=robots,
                seconds=seconds,
                embodiment=embodiment,
                # one process with --server: its one policy server answers every robot, like one replica
                procs=procs or (1 if server else min(robots, os.cpu_count() or 1)),
                latency_ms=latency_ms,
                server=server,
                rt_priority=rt_priority or None,
            )
        except ValueError as exc:
            fail(str(exc))
        wrote = write_outputs(result, out) if out is not None else None
        show(result, json_out, format_table, wrote)
