"""`python -m regproxy` runs the command line."""

from regproxy.cli import main

if __name__ == "__main__":
    main()
