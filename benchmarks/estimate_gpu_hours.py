"""GPU-hours of grid files, estimated from counted FLOPs (:mod:`diffmi_ray.cost`).

Usage::

    python benchmarks/estimate_gpu_hours.py grids/paper/*.yaml                 # assumed 40 TFLOP/s
    python benchmarks/estimate_gpu_hours.py grids/paper/*.yaml --markdown      # README table
    python benchmarks/estimate_gpu_hours.py grids/paper/*.yaml --tflops 60     # another assumption
    python benchmarks/estimate_gpu_hours.py grids/paper/*.yaml --measure       # time real steps here
    python benchmarks/estimate_gpu_hours.py --validate results grids/cpu/table1.yaml

Files whose name starts with ``_`` (includes such as ``_celeba_base.yaml``) are skipped. Paper grids
plan without their dataset folders (sizes come from :data:`diffmi_ray.cost.PAPER_DATASETS`).

``--validate RESULTS_DIR GRID`` checks the model on a grid that has run: it measures this CPU's
throughput (paper-size models, and the grid's own U-Net and target at their batch sizes), predicts
the seconds of every finished instance (``RESULTS_DIR/executions/*.json`` with status ok, read only)
and prints predicted vs measured per stage type. GPU-hours assume one GPU per unit of work: a stage
on 2 GPUs (the paper's CDM pretraining) takes half the wall time for the same GPU-hours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmi_ray import cost  # noqa: E402
from diffmi_ray.config.experiment import STAGES  # noqa: E402

COST_STAGES = [s for s in STAGES if s != "split"]  # split is always 0 FLOPs


def _fmt_h(h: float) -> str:
    return f"{h:,.1f}" if h >= 0.05 or h == 0 else f"{h:.2g}"


def _throughput(args) -> tuple[float, str, str]:
    """(sustained FLOP/s, a sentence saying where it comes from, the hours' unit: GPU-h or CPU-h)."""
    if args.measure:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"measuring training steps on {dev} ...", file=sys.stderr)
        m = cost.measure_sustained_flops(dev, threads=args.threads)
        parts = ", ".join(f"{k}: batch {v['batch']}, {v['seconds_per_step']:.3f} s/step, "
                          f"{v['flops_per_s'] / 1e12:.3g} TFLOP/s" for k, v in m["models"].items())
        unit = "CPU-hours of this machine (not GPU-hours)" if dev.type == "cpu" else "GPU-hours"
        return m["flops_per_s"], (f"Hours are {unit}: MEASURED on {m['device']} ({m['threads']} thread(s)): "
                                  f"{m['flops_per_s'] / 1e12:.3g} TFLOP/s sustained ({parts})"), unit[:3] + "-h"
    tf = args.tflops if args.tflops is not None else cost.DEFAULT_SUSTAINED_TFLOPS
    what = "the default" if args.tflops is None else "given with --tflops"
    return tf * 1e12, (f"Hours are GPU-hours at an ASSUMED sustained throughput {tf:g} TFLOP/s per GPU ({what}; "
                       "an assumption, not a measurement -- see diffmi_ray.cost.DEFAULT_SUSTAINED_TFLOPS, or run "
                       "--measure on a GPU)"), "GPU-h"


def estimate(args) -> int:
    import pandas as pd

    from diffmi_ray.pipeline.plan import plan_grid

    grids = [Path(g) for g in args.grids if not Path(g).name.startswith("_")]
    if not grids:
        print("no grid files given", file=sys.stderr)
        return 2
    flops_per_s, source, unit = _throughput(args)
    rows, frames = [], []
    for g in grids:
        plan = plan_grid(cost.load_grid_for_estimate(g))
        df, per, total = cost.estimate_plan(plan, flops_per_s)
        frames.append(df.assign(grid=str(g)))
        rows.append({"grid": str(g), "instances": len(df), **dict(zip(per["stage"], per["gpu_hours"])),
                     "total": total})
        if not args.markdown:
            print(f"\n== {g}: {len(df)} unique stage instances, {total:,.1f} {unit}")
            print(per.to_string(index=False, formatters={"flops": "{:.3g}".format, "gpu_hours": _fmt_h}))
            if args.details:
                with pd.option_context("display.max_colwidth", 200, "display.width", 250):
                    print(df[["stage", "label", "flops", "gpu_hours", "detail"]].to_string(
                        index=False, formatters={"flops": "{:.3g}".format, "gpu_hours": "{:.3g}".format}))
    union = pd.concat(frames).drop_duplicates(["stage", "key"])
    union_stage = union.groupby("stage")["gpu_hours"].sum()
    rows.append({"grid": "all files above (shared instances once)", "instances": len(union),
                 **{s: float(union_stage.get(s, 0.0)) for s in COST_STAGES}, "total": float(union["gpu_hours"].sum())})
    if args.markdown:
        print(f"Hours per grid file. {source}. FLOPs counted per network (diffmi_ray/cost.py); "
              "fine-tuning assumed to run max_epochs; split costs 0.\n")
        head = ["grid file", "unique stage instances"] + COST_STAGES + [f"total {unit}"]
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rows:
            name = r["grid"] if r["grid"].startswith("all ") else f"`{r['grid']}`"
            cells = [name, f"{r['instances']}"] + [_fmt_h(r.get(s, 0.0)) for s in COST_STAGES] + [_fmt_h(r["total"])]
            if r["grid"].startswith("all "):
                cells = [f"**{c}**" for c in cells]
            print("| " + " | ".join(cells) + " |")
    else:
        print(f"\n{source}")
        print(f"all files: {len(union)} unique instances, {union['gpu_hours'].sum():,.1f} {unit} "
              "(instances shared between files counted once)")
    return 0


# ------------------------------------------------------------------------------------------ validate


def grid_calibration_models(plan) -> list[tuple[str, cost.Net, int]]:
    """The grid's own CDM U-Net (at the prior's batch size) and target classifier (at its training
    batch), for a throughput measured at the grid's scale."""
    out = []
    for inst in plan.instances.values():
        if inst.stage == "train_prior" and inst.config["kind"] == "cdm" and not out:
            unet, _ = cost._cdm_parts(plan, inst)
            out.append((f"grid U-Net {unet.short()}", unet, int(inst.config["prior"]["batch_size"])))
    for inst in plan.instances.values():
        if inst.stage == "train_classifier":
            net = cost._classifier_of(plan, inst)
            out.append((f"grid classifier {net.short()}", net, int(inst.config["classifier"]["train"]["batch_size"])))
            break
    return out


def _records(results: Path) -> dict[tuple[str, str], dict]:
    """The latest ok execution record of every (stage, key) in ``results/executions`` (read only)."""
    recs: dict[tuple[str, str], dict] = {}
    for p in sorted((results / "executions").glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a record being written right now
        if r.get("status") != "ok":
            continue
        k = (r["stage"], r["key"])
        if k not in recs or r.get("finished", "") > recs[k].get("finished", ""):
            recs[k] = r
    return recs


def _executed_plan(results: Path, loaded):
    """A Plan of the instances this grid's run used, rebuilt from what the run stored (read only).

    The keys come from ``results/<grid name>/points/*/point.json`` (each point's stage keys), the
    configs from ``results/artifacts/<stage>/<key>/config.json``, so the estimate uses the configs
    that actually ran even when the code has changed keys since. Without point files the grid is
    planned with the current code and only matching keys are used.
    """
    from diffmi_ray.pipeline.plan import Plan, StageInstance, plan_grid

    points = sorted((results / loaded.grid.name / "points").glob("*/point.json"))
    if not points:
        return plan_grid(loaded), "planned with the current code"
    plan = Plan()

    def add(stage: str, key: str) -> None:
        if (stage, key) in plan.instances:
            return
        d = json.loads((results / "artifacts" / stage / key / "config.json").read_text())
        parents = {r: tuple(v.split("/", 1)) if isinstance(v, str) else tuple(v) for r, v in d["parents"].items()}
        plan.instances[(stage, key)] = StageInstance(stage, key, d["config"], parents, d["label"])
        for ps, pk in parents.values():
            add(ps, pk)

    for p in points:
        for role in json.loads(p.read_text()).get("stages", {}).values():
            if (results / "artifacts" / role["stage"] / role["key"] / "config.json").is_file():
                add(role["stage"], role["key"])
    return plan, f"configs of {len(points)} finished point(s) read from {results}/artifacts"


def _without_missing_metrics(results: Path, inst):
    """An evaluate instance without the metric groups its run reported missing (``missing.json``: e.g.
    FID / PRDC / LPIPS when their weights could not be downloaded), whose networks never ran."""
    from dataclasses import replace

    from diffmi_ray.metrics.suite import GROUP_ROWS

    p = results / "artifacts" / inst.stage / inst.key / "missing.json"
    if inst.stage != "evaluate" or not p.is_file():
        return inst
    missing = set(json.loads(p.read_text()))
    ev = dict(inst.config["evaluation"])
    from diffmi_ray.config.evaluation import EvaluationConfig

    metrics = EvaluationConfig.model_validate(ev).metrics
    ev["metrics"] = [m for m in metrics if not set(GROUP_ROWS.get(m, (m,))) <= missing]
    return replace(inst, config={**inst.config, "evaluation": ev})


def validate(args) -> int:
    import pandas as pd

    from diffmi_ray.config.loader import load_grid

    results, grid = Path(args.validate[0]), Path(args.validate[1])
    loaded = load_grid(grid)
    plan, how = _executed_plan(results, loaded)
    threads = args.threads or loaded.grid.run.torch_threads or 1
    recs = _records(results)
    done = [i for i in plan.instances.values() if i.id in recs]
    print(f"{grid}: {len(plan.instances)} stage instances ({how}), {len(done)} with an ok record in "
          f"{results}/executions")
    if not done:
        return 1
    print(f"measuring this CPU with {threads} thread(s) (the grid's run.torch_threads) ...", file=sys.stderr)
    paper = cost.measure_sustained_flops("cpu", threads=threads, steps=args.steps)
    own = cost.measure_sustained_flops("cpu", models=grid_calibration_models(plan), threads=threads,
                                       steps=max(args.steps, 5))
    for name, m in (("paper-size models", paper), ("this grid's models", own)):
        print(f"CPU throughput, {name}: {m['flops_per_s'] / 1e9:.3g} GFLOP/s  (" + "; ".join(
            f"{k} batch {v['batch']}: {v['seconds_per_step']:.3g} s/step = {v['flops_per_s'] / 1e9:.3g} GFLOP/s"
            for k, v in m["models"].items()) + ")")
    rows = []
    for inst in done:
        inst = _without_missing_metrics(results, inst)
        fl = sum(t.flops for t in cost.instance_terms(plan, inst))
        rows.append({"stage": inst.stage, "label": inst.label, "flops": fl,
                     "pred_paper_s": fl / paper["flops_per_s"], "pred_grid_s": fl / own["flops_per_s"],
                     "measured_s": float(recs[inst.id]["seconds"])})
    df = pd.DataFrame(rows)
    per = df.groupby("stage").agg(n=("label", "size"), gflops=("flops", lambda x: x.sum() / 1e9),
                                  pred_paper_s=("pred_paper_s", "sum"), pred_grid_s=("pred_grid_s", "sum"),
                                  measured_s=("measured_s", "sum"))
    per = per.reindex([s for s in STAGES if s in per.index])
    per["measured/pred_paper"] = per["measured_s"] / per["pred_paper_s"]
    per["measured/pred_grid"] = per["measured_s"] / per["pred_grid_s"]
    tot = per[["n", "gflops", "pred_paper_s", "pred_grid_s", "measured_s"]].sum()
    per.loc["ALL"] = [*tot.values, tot["measured_s"] / tot["pred_paper_s"], tot["measured_s"] / tot["pred_grid_s"]]
    per["n"] = per["n"].astype(int)
    fmt = {c: "{:.3g}".format for c in per.columns if c != "n"}
    print("\npredicted (counted FLOPs / measured CPU FLOP/s) vs measured seconds, per stage type:")
    print(per.to_string(formatters=fmt))
    if args.details:
        print(df.sort_values(["stage", "label"]).to_string(index=False, formatters={
            c: "{:.3g}".format for c in ("flops", "pred_paper_s", "pred_grid_s", "measured_s")}))
    print("\nevaluate: metric groups a run reported missing (no weights offline) are left out of its prediction.")
    print("ratio > 1: the stage took longer than its counted FLOPs at the measured rate (overheads the FLOP "
          "count leaves out: data loading, element-wise ops, piq IQA metrics, process start, other trials "
          "sharing the CPU).")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grids", nargs="*", help="grid files (names starting with '_' are skipped)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tflops", type=float, default=None,
                   help=f"assumed sustained TFLOP/s per GPU (default {cost.DEFAULT_SUSTAINED_TFLOPS:g})")
    g.add_argument("--measure", action="store_true", help="measure training steps on this machine (cuda if present)")
    ap.add_argument("--markdown", action="store_true", help="print one markdown table for all grid files")
    ap.add_argument("--details", action="store_true", help="also print every stage instance")
    ap.add_argument("--validate", nargs=2, metavar=("RESULTS_DIR", "GRID"),
                    help="compare predicted and measured CPU seconds of a finished CPU-scale grid")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while measuring")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model when measuring")
    args = ap.parse_args(argv)
    if args.validate:
        return validate(args)
    return estimate(args)


if __name__ == "__main__":
    sys.exit(main())
