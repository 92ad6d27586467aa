"""Command line (being split into modules; see retrieval.py)."""

from m3embed.cli.retrieval import build_parser, main

__all__ = ["build_parser", "main"]
