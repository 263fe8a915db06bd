"""Job compiler: config -> JobPlan (plan.py, compiler.py, inputs.py) -> rendered job dir
(render.py, jobdir.py). Login side: imports nothing heavy."""
