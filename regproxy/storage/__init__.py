"""The synchronous storage core shared by `serve` and the offline commands."""
