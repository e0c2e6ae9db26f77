"""The entry points: one module per stage, each exposing `run(cfg)` (corpus, score, select,
inspect, train), two compositions of stages (demo, compare), and the `midrank` command (cli)
that dispatches to them. Stages talk through files and share code through `pipeline/`."""
