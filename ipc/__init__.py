"""Shared leaf package: frames, schemas, validation and socket helpers.

Everything here is imported by the supervisor, the workers and the CLI, so it
imports no other package of ours.
"""

__version__ = "0.1.0"
