"""The `hf-offload` command line: `launch`, `plan` and `bench`, one module each, gathered by `cli`."""
