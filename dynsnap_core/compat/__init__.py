"""Restore compatibility: facts recorded at checkpoint (``facts``) and the check run before every restore (``compare``)."""
from __future__ import annotations

from .compare import Fact, Report, check, format_text, require
from .facts import collect

__all__ = ["Fact", "Report", "check", "require", "format_text", "collect"]
