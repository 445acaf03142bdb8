"""regproxy's benchmark against Debian's docker-registry (see bench.py); not collected by pytest."""
