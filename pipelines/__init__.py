"""DVC stage entry points: thin CLIs that read params.yaml, call cfebm, and do the I/O."""
