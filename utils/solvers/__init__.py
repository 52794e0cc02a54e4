"""Sparse solvers: orthogonal matching pursuit and non-negative lasso (ADMM, active set)."""
