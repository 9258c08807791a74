"""The HTTP API server (DESIGN.md §9): a process of its own that waportd supervises; it imports ipc only."""
