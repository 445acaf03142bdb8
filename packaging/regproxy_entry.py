"""Entry script of the one-file binary: the `regproxy` command line, every command."""

from regproxy.cli import main

if __name__ == "__main__":
    main(prog_name="regproxy")
