"""HF checkpoint -> TurboMind-style workspace (`python -m deploy`); see deploy/convert.py."""
