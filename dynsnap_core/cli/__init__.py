"""The ``dynsnap`` command line: commands (``main``), system checks (``doctor``), ``inspect``, progress output
(``ui``). ``python -m dynsnap_core.cli ...`` runs the commands."""
from __future__ import annotations

from .main import build_parser, main  # noqa: F401
