"""The pull-through cache: upstream client, single-flight fetches, caching policy."""
