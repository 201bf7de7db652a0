"""Config tree, the Ray driver loop, weight broadcast wiring, metrics sinks and the CLI."""
