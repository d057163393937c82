"""Command-line mains of mtrec: thin modules that parse a config and call library functions."""
