"""Which backend by name: the one place that knows the backends, importing each only when asked.

Apart from `workers/backend.py` (the interface the backends import), so the interface and its
implementations do not import each other; lazy, so neonize never loads where it is not used.
"""

from __future__ import annotations

from workers.backend import Backend


def load(name: str) -> type[Backend]:
    """The backend class called `name`; `ValueError` for a name no backend has."""
    if name == "sim":
        from workers.sim_backend import SimBackend

        return SimBackend
    if name == "neonize":
        from workers.neonize_backend import NeonizeBackend

        return NeonizeBackend
    raise ValueError(f"unknown backend {name!r}")
