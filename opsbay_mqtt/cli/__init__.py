"""The `opsbay` command line: one deployable, apart from the daemons' core.

`app` holds the typer app, the shared options and the one mapping from errors to exit codes;
`jobs`, `admin` and `fleet` its commands; `args` the checks of what was typed; `render`,
`waiting`, `watchlog` and `cronicle` what a person or Cronicle sees; `stack` the local
all-in-one. This file imports nothing, so importing one of them costs only that one.
"""
