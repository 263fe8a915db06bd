"""In-job entry point (`python -m hpcinfer.worker JOBDIR`).

For now the worker is a preflight (preflight.py): it checks and reports, then exits
0 (ok), 2 (a check failed) or 3 (stopped by the warning signal: requeue me).
"""
