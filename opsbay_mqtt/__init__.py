"""opsbay-mqtt: an MQTT job bus for operations teams.

One note for the whole package, instead of one beside every definition: every `opsbay` call
and every node's agent pays for what it imports and defines at start-up (docs/benchmarks.md
has the figures). So the small records on those paths are named tuples, not dataclasses (a
frozen dataclass costs about 1 ms to define), and the protocol's records and messages share one
`__eq__` and `__repr__` instead of generating them per class; modules import what only one
command needs inside
that command; the command line never imports pydantic and the agent never imports the command
line (import-linter contracts in pyproject.toml); and the entry points defer urllib.request
(lazymodules).
"""

__version__ = "0.1.0"
