"""The ``goodnet`` command: one module per command, its parser and its handler side by side
(:mod:`goodnet.cli.repair`, :mod:`goodnet.cli.scan`, ...), the options they share in
:mod:`goodnet.cli.options`, and the parser and :func:`main` in :mod:`goodnet.cli.main`.

Each handler parses its arguments, calls the library and prints; the work is the library's.
"""

from goodnet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
