"""Entry points for `python -m jobs.<name>` and `ray job submit`. Each parses arguments and calls a builder."""
