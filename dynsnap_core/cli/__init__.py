"""The ``dynsnap`` command line: commands (``main``), system checks (``doctor``), ``inspect``, progress output
(``ui``). ``python -m dynsnap_core.cli ...`` runs the commands."""
