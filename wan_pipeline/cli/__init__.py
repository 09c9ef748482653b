"""The `wan-bench` command line: subcommand modules are imported only when their command runs."""
