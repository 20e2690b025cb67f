"""Runnable examples: the bank transfer, agents and the outbox, the seat-reservation service."""
