"""Refusal Lab: what model compression does to a language model's refusal mechanism, and its repair.

The library behind the dashboard (``app.py``) and the CLI (``python -m refusal_lab``): typed results in
:mod:`refusal_lab.results`, the staged and stored study in :mod:`refusal_lab.study`."""

__version__ = "0.2.0"
