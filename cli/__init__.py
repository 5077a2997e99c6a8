"""Command-line front end of lite (installed as lite.cli)."""
