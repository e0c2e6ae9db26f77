"""midrank's library: configuration, corpus reading and sharding, model loading, scoring, selection
maths, artifacts and provenance, plotting and the CLI. Stages (`stages/`) are built from these parts."""

__version__ = "0.1.0"
