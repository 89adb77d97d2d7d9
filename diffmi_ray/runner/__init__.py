"""The grid runner: the only package that imports Ray.

- :mod:`~diffmi_ray.runner.driver` -- ``run_grid``: plan, schedule, collect, summarise, exit status;
- :mod:`~diffmi_ray.runner.ray_backend`, :mod:`~diffmi_ray.runner.ray_jobs` -- Ray tasks, Ray Train
  jobs and the Tune trials of the attacks;
- :mod:`~diffmi_ray.runner.session` -- embedded local Ray / joining a cluster;
- :mod:`~diffmi_ray.runner.execution` -- one stage instance where the runner put it, with records;
- :mod:`~diffmi_ray.runner.records` -- execution and failure records, stage logs;
- :mod:`~diffmi_ray.runner.results` -- ``<storage>/<grid>/results.csv`` and the per-point files;
- :mod:`~diffmi_ray.runner.status` -- ``diffmi-ray status`` (no Ray);
- :mod:`~diffmi_ray.runner.progress` -- the live progress view;
- :mod:`~diffmi_ray.runner.faults`, :mod:`~diffmi_ray.runner.testing` -- test hooks and stand-in stages.

Importing this package does not import Ray (only ``ray_backend``, ``ray_jobs`` and ``session`` do).
"""
