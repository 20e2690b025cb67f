"""The seat-reservation service: ``python -m examples.seats`` (see README)."""
