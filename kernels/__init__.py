"""Triton kernels and their launch wrappers (imports nothing of tomec)."""
