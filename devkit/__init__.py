"""MWM's development kit: what tests, benchmarks (``bench/``) and the demo (``scripts/demo.py``) run MWM
with on this machine. Not part of MWM: it is left out of the wheel and the image (``pyproject.toml``
packages, ``.dockerignore``), and nothing under ``wm/``, ``consumers/``, ``producers/`` or ``schemas/``
imports it.

- ``devkit.peers``: the real DICOM peers (dcmtk ``storescu``/``storescp``, Orthanc) as processes;
- ``devkit.dicom``: the synthetic CT study generator (``python -m devkit.dicom OUTDIR``);
- ``devkit.services``: per-run settings (own exchange, queues, database, bucket), clean-up, consumer
  processes, fault injection on a stack (``scripts/services``), waiting without fixed sleeps;
- ``devkit.pipeline``, ``devkit.events``, ``devkit.process``: registering applications, feeding files,
  tapping MWM's events, the API as a subprocess, memory readings;
- ``devkit.ig_emulator``, ``devkit.ig_loop``: a MONAI Informatics Gateway emulator on the real services;
- ``devkit.argo_stack``: the machine's Argo stack (``scripts/argo-stack``) and what no container does there.

pytest fixtures and test-only helpers stay in ``tests/`` (``tests/conftest.py``, ``tests/support``).
"""
