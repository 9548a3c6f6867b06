"""``python -m aecp`` is the ``aecp`` command."""

from aecp.cli.main import main

if __name__ == "__main__":
    main()
