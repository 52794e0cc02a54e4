"""reproduce.py's library: the plan of each paper (plan.py), the runner of its steps (runner.py), the smoke
test's data (smoke.py) and REPORT.md (report.py)."""
