"""Local checkpoint store: atomic commit, metadata, retention, resume lookup."""
