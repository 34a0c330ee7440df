"""Benchmarks behind ``dynsnap bench io|memfd|weights|restore|e2e``: presentation code, not library code."""
