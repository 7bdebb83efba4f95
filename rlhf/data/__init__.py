"""Data: file formats and loading of the user's (or the built-in) data sets."""
