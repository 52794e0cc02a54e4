"""reproduce.py's library: the plan of each paper, the step runner and REPORT.md."""
