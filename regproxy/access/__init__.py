"""Authentication and authorisation without a server: htpasswd users, rules, signed tokens."""
