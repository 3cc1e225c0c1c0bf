"""The only package that knows paths, fsspec, file formats and atomic publication."""
