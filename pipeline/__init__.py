"""midrank's library: configuration, the run layout and typed outputs, corpus reading and
sharding, model loading, scoring, selection maths, plotting, training and evaluation. It never
imports `stages/`, which are built from these parts."""

__version__ = "0.1.0"
