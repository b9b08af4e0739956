"""Checkpoint uploads: storage backends (file://, gs://), streaming tar parts, background uploader."""
