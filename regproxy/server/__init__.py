"""The aiohttp server: routes, handlers per resource, error rendering."""
