"""The ``aecp`` command (Typer + Rich). Talks to clusters over REST only."""
