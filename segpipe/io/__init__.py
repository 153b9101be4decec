"""Readers and writers, one module per kind of file."""
