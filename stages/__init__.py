"""One module per pipeline stage, each exposing `run(cfg) -> artifacts`. Stages talk only through
files and share code only through `pipeline/`."""
