"""Batched sampling, verifier-guided search and verifiers."""
