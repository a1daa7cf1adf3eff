"""The `smoe` command line, benchmarks and process launching."""
