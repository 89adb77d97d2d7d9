"""Peak CPU memory of one Diff-MI fine-tuning step, gradient checkpointing off vs on.

One step = DPM-Solver++(2M) with ``--steps`` steps (default 10) on the CFG model (w = 3, one batched
call of 2B images per step) from x_T ~ N(0, I), L_cls (top-k + p-reg) of a tiny target on 2
augmented copies of the official 8 loss targets, backward through the whole chain into label_emb +
the official middle-block layers (2, 4, 8, 10, 12). The U-Net is the paper's CDM
(``diffmi_unet_64``: 64 px RGB, 128 channels, mult 1,2,3,4, 3 res blocks, attention at 16 and 8 px,
1000 classes + null), randomly initialised with its zero-initialised layers made nonzero so that
gradients flow (the weight values do not change the memory).

Each mode runs in a fresh subprocess. The child builds everything, measures its resident set size
(RSS) as the baseline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, Linux
>= 4.0; falling back to ``ru_maxrss`` when that is not allowed), runs the step and reports the peak
RSS (VmHWM). The printed "step peak" is peak minus baseline: the memory the step itself needed
(activations kept for backward, gradients, recomputation buffers).

Modes: ``off`` (plain autograd through the chain), ``on`` (``grad_checkpointing``: each solver
step's model evaluation is recomputed in backward, what the fine-tuning stage does), ``blocks``
(additionally every U-Net ResBlock/AttentionBlock is checkpointed inside the recomputation).

Usage::

    python benchmarks/bench_finetune_memory.py                    # batch 1, 10 steps, off vs on
    python benchmarks/bench_finetune_memory.py --batch 1 2 --modes off on blocks
    python benchmarks/bench_finetune_memory.py --batch 4 --modes on   # when off does not fit in RAM

Measured (this repo's 2-core CPU box, shared with other jobs, load ~10; torch 2.14, 2 threads):

    batch 1   off  5660 MB step peak   (887 s)        on   876 MB  (1108 s)    off / on = 6.5x
    batch 4   on   2893 MB (1498 s)    off not run: ~4 x 5660 MB = ~22.6 GB does not fit in 23 GB of RAM
              (the official code reports ~24 GB on the GPU), i.e. ~7.8x estimated

Both modes give the same gradient norm. Wall time is dominated by CPU contention: expect minutes
per mode at batch 1 on an idle machine, roughly linear in the batch; ``on`` costs one extra forward
per solver step. At toy sizes (``--image-size 16``) the activations are smaller than the
recomputation's fixed overhead (~0.2-0.3 GB here) and ``on`` is not smaller than ``off``; the ratio
is meaningful at the paper's 64 px.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("off", "on", "blocks")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, batch: int, steps: int, threads: int, image_size: int) -> dict:
    import torch

    from diffmi_ray.config.methods import FinetuneConfig
    from diffmi_ray.diffusion import linear_schedule
    from diffmi_ray.models import create
    from diffmi_ray.models.unet import OFFICIAL_FINETUNE_LAYERS, finetune_parameter_names
    from diffmi_ray.training.finetune import DifferentiableSampler, classifier_loss, make_augment, set_trainable

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = FinetuneConfig(sampler_steps=steps, batch_size=batch, grad_checkpointing=mode != "off")
    if image_size == 64:
        unet = create("diffmi_unet_64", 1000)
    else:  # same widths at another size (attention at 1/4 and 1/8 of it)
        unet = create("cdm_unet", 1000, image_size=image_size, in_channels=3, model_channels=128,
                      channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                      attention_resolutions=(image_size // 4, image_size // 8), num_heads=4)
    with torch.no_grad():  # zero-initialised output convs would block every gradient: make them nonzero
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    unet.eval()
    unet.set_gradient_checkpointing(mode == "blocks")
    params = set_trainable(unet, finetune_parameter_names(unet, OFFICIAL_FINETUNE_LAYERS))
    target = create("small_cnn", 1000, in_channels=3, width=8).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    centroids = torch.randn(1000, target.feature_dim)
    sampler = DifferentiableSampler(unet, linear_schedule(), steps=steps, guidance=cfg.guidance,
                                    official_intermediates=True, checkpoint_steps=cfg.grad_checkpointing)
    augment = make_augment(image_size)
    x_T = torch.randn(batch, 3, image_size, image_size)
    y = torch.arange(batch)
    # warm-up of lazy imports / kernel selection on a 1-step chain (not the measured step)
    warm = DifferentiableSampler(unet, linear_schedule(), steps=1, checkpoint_steps=cfg.grad_checkpointing)
    with torch.no_grad():
        warm(x_T[:1], y[:1])
    del warm
    gc.collect()

    baseline_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.time(), time.process_time()
    targets = sampler(x_T, y)
    loss, _ = classifier_loss(target, targets, y, augment=augment, copies=cfg.aug_copies, k=cfg.loss_k,
                              alpha=cfg.loss_alpha, centroids=centroids)
    loss.backward()
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    return {"mode": mode, "batch": batch, "steps": steps, "image_size": image_size, "threads": threads,
            "baseline_mb": baseline_kb / 1024, "peak_mb": peak_kb / 1024, "step_mb": (peak_kb - baseline_kb) / 1024,
            "peak_reset": reset, "peak_before_step_mb": peak_before_kb / 1024, "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "loss": float(loss.detach()), "grad_norm": grad_norm, "n_targets": len(targets)}


def run_mode(mode: str, batch: int, steps: int, threads: int, image_size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(batch), "--steps", str(steps),
           "--threads", str(threads), "--image-size", str(image_size)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        killed = proc.returncode in (-9, 137)
        return {"mode": mode, "batch": batch, "error": "killed (out of memory?)" if killed else " | ".join(tail)}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.time() - t0
    res["child_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to measure (default 1)")
    ap.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps (default 10, the official)")
    ap.add_argument("--modes", nargs="+", default=["off", "on"], choices=MODES)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--image-size", type=int, default=64, help="64 = the paper's diffmi_unet_64")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.batch[0], a.steps, a.threads, a.image_size)), flush=True)
        return 0

    print(f"Diff-MI fine-tuning step: paper CDM at {a.image_size} px, {a.steps} DPM-Solver++ steps, CFG w=3, "
          f"L_cls on 2 aug copies of the official targets; peak RSS of a fresh process minus its baseline")
    results = []
    t_all = time.time()
    for b in a.batch:
        row = {}
        for m in a.modes:
            r = run_mode(m, b, a.steps, a.threads, a.image_size)
            results.append(r)
            row[m] = r
            if "error" in r:
                print(f"  batch {b} {m:>6}: FAILED ({r['error']})", flush=True)
            else:
                print(f"  batch {b} {m:>6}: step peak {r['step_mb']:9.1f} MB  (baseline {r['baseline_mb']:.0f} MB, "
                      f"peak {r['peak_mb']:.0f} MB, step {r['seconds']:.1f} s wall / {r['cpu_seconds']:.1f} s CPU, "
                      f"grad norm {r['grad_norm']:.6g})",
                      flush=True)
        ok = [m for m in a.modes if "error" not in row[m]]
        if "off" in ok:
            for m in ok:
                if m != "off":
                    ratio = row["off"]["step_mb"] / max(row[m]["step_mb"], 1e-9)
                    print(f"  batch {b}: off / {m} = {ratio:.2f}x", flush=True)
    print(f"total {time.time() - t_all:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
