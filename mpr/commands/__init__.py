"""The command-line drivers: each parses options into a pydantic config and calls one stage."""
