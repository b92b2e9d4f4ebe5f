"""The `craft` command line (Typer). Thin: parses arguments and calls the library layers."""
