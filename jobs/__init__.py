"""Thin command-line entry points (argument parsing, ``ray.init``, summary)."""
