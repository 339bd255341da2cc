"""Commands around a finished run: evaluate, predict, export and report (``python -m trainer.<tool>``)."""
