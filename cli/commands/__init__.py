"""One module per command: what it prints (the options come from the schema, see cli/build.py)."""
