"""Worker processes: one per company, each owning that company's session."""
