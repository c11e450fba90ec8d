"""The pure core: models and decisions, synchronous, no I/O (see ``ARCHITECTURE.md``).

Matching a file to applications and placing it in a bucket (``discovery``), the job model and its state
machine (``jobs``), what an engine is given and reports (``engines``), export tasks and the one function
that decides an export's outcome (``exports``). An import-linter contract keeps adapters, I/O libraries and
``wm.config`` out of it.
"""
