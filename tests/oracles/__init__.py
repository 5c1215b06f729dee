"""Slow, loop-based, obviously correct implementations, written independently of tomec.ops."""
