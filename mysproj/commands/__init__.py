"""The `mysproj` commands that are not stages: they write no stage output. `ask` and `show-example` look at a
model, `status` and `logs` at a Kubernetes run, `reproduce` runs one end to end. Each module has
`add_command(subparsers, parser_class)`; mysproj/cli.py registers them beside the stage commands (`run` and
`bench` live with the pipeline and the benchmarks they drive)."""
