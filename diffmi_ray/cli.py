"""Command line: ``diffmi-ray plan | run | status | report``.

User errors (bad grid files, missing datasets, unknown names) print a clear message without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffmi_ray.errors import UserError

EXIT_USER_ERROR = 2


def _load(args):
    from diffmi_ray.config.loader import load_grid

    loaded = load_grid(args.grid)
    if getattr(args, "storage", None):
        loaded.grid.storage = args.storage
    return loaded


def _store(loaded):
    from diffmi_ray.pipeline.store import ArtifactStore

    return ArtifactStore(loaded.storage_root)


def cmd_plan(args) -> int:
    from diffmi_ray.config.experiment import STAGES
    from diffmi_ray.pipeline.plan import plan_grid

    loaded = _load(args)
    plan = plan_grid(loaded)
    store = _store(loaded)
    g = loaded.grid
    print(f"grid '{g.name}' from {loaded.path}")
    print(f"storage: {loaded.storage_root}")
    print(f"protocol: first {g.protocol.classes} classes x {g.protocol.images_per_class} images, "
          f"evaluation model {g.protocol.eval.model}")
    print(f"\n{len(loaded.points)} grid point(s):")
    for point, _roles in plan.points:
        c = point.config
        axes = ", ".join(f"{k}={v}" for k, v in point.axis_values.items()) or "(base)"
        print(f"  {point.point_id}  {c.method:<8} {c.data.private.dataset}->{c.data.public.dataset} "
              f"target={c.target.model}  {axes}")
    print("\nstage instances (unique / already done):")
    by_stage = plan.by_stage()
    total = done_total = 0
    done_keys = {stage: store.done_keys(stage) for stage in STAGES}
    for stage in STAGES:
        insts = by_stage[stage]
        done = sum(1 for i in insts if i.key in done_keys[stage])
        total += len(insts)
        done_total += done
        print(f"  {stage:<17} {len(insts):>4} needed  {done:>4} done")
    print(f"  {'total':<17} {total:>4} needed  {done_total:>4} done")
    if args.verbose:
        print("\nwaves:")
        for n, wave in enumerate(plan.waves()):
            print(f"  wave {n}: " + ", ".join(f"{i.stage}/{i.key[:8]} ({i.label})" for i in wave))
    if args.gpu_hours is not None:
        from diffmi_ray.cost import estimate_plan

        per_inst, _, _ = estimate_plan(plan, args.gpu_hours * 1e12)
        todo = per_inst[[key not in done_keys[stage] for stage, key in zip(per_inst.stage, per_inst.key)]]
        print(f"\nestimated GPU-hours of the instances not done yet, at an assumed {args.gpu_hours:g} TFLOP/s "
              "sustained (counted FLOPs; diffmi_ray/cost.py):")
        for stage in STAGES:
            print(f"  {stage:<17} {todo.gpu_hours[todo.stage == stage].sum():>10.3g}")
        print(f"  {'total':<17} {todo.gpu_hours.sum():>10.3g}")
    return 0


def cmd_run(args) -> int:
    from diffmi_ray.runner.driver import run_grid

    loaded = _load(args)
    return run_grid(loaded, address=args.address, local=args.local, num_cpus=args.num_cpus,
                    resume_command=" ".join(["diffmi-ray", *sys.argv[1:]]))


def cmd_status(args) -> int:
    from diffmi_ray.runner.status import print_status

    return print_status(_load(args))


def cmd_report(args) -> int:
    from diffmi_ray.reporting import build_report, resolve_results_dir

    target = Path(args.target)
    if target.is_file():
        loaded = _load(argparse.Namespace(grid=target, storage=args.storage))
        results_dir = Path(_store(loaded).grid_dir(loaded.grid.name))
    else:
        results_dir = resolve_results_dir(target)
    index = build_report(results_dir, Path(args.out) if args.out else None)
    print(f"report: {index.html}")
    for name, why in sorted(index.skipped.items()):
        print(f"  not built: {name} ({why})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmi-ray", description="Ray-distributed model-inversion experiment grids.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plan", help="print the grid points and the stage DAG (computes nothing)")
    sp.add_argument("grid", type=Path, help="grid YAML file")
    sp.add_argument("--storage", help="override the grid's storage root (path or fsspec URI)")
    sp.add_argument("-v", "--verbose", action="store_true", help="also print the waves of the DAG")
    sp.add_argument("--gpu-hours", nargs="?", type=float, const=40.0, default=None, metavar="TFLOPS",
                    help="also estimate the GPU-hours still to run, from counted FLOPs at TFLOPS sustained "
                         "(default 40; benchmarks/estimate_gpu_hours.py --measure gives a real figure)")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("run", help="run the grid (embedded local Ray unless --address)")
    sp.add_argument("grid", type=Path)
    sp.add_argument("--storage", help="override the grid's storage root (path or fsspec URI)")
    sp.add_argument("--address", help="Ray cluster address ('auto' joins a running cluster)")
    sp.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    sp.add_argument("--local", action="store_true", help="run every stage in this process, without Ray")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("status", help="done / pending / failed stage instances of a grid")
    sp.add_argument("grid", type=Path)
    sp.add_argument("--storage")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("report", help="tables, plots and report.html from saved results")
    sp.add_argument("target", help="a grid YAML or a results folder (<storage>/<grid name>)")
    sp.add_argument("--storage")
    sp.add_argument("--out", help="output folder (default: <results>/report)")
    sp.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
