"""The `gastune` command: one module per subcommand, assembling the library; the only place that prints."""
