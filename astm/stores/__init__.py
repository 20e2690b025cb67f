"""Durable storage backends (each imported only when its URL is used)."""
