"""Builders of the embedded corpus and models; their outputs (corpus/, models/) are git-ignored."""
