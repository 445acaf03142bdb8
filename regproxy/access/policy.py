"""Who may pull, push and delete where: first matching rule wins.

Principals in a rule: `anonymous` (everybody), `@authenticated` (any signed-in
user), `@group` (a group from `[auth.groups]`), or a user name.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from regproxy.config import AccessRule, AuthConfig
from regproxy.reference import under_prefix

ACTIONS = ("pull", "push", "delete")
ANONYMOUS = "anonymous"
AUTHENTICATED = "@authenticated"


class Policy:
    def __init__(self, auth: AuthConfig, proxy_prefix: str) -> None:
        self.rules = list(auth.rules)
        self.groups = {name: set(members) for name, members in auth.groups.items()}
        self.proxy_pull = list(auth.proxy_pull)
        self.proxy_prefix = proxy_prefix

    def _admits(self, principals: list[str], user: str | None) -> bool:
        for who in principals:
            if who == ANONYMOUS:
                return True
            if user is None:
                continue
            if who in (AUTHENTICATED, user):
                return True
            if who.startswith("@") and user in self.groups.get(who[1:], ()):
                return True
        return False

    def rule_for(self, name: str) -> AccessRule | None:
        for rule in self.rules:
            if fnmatchcase(name, rule.repository):
                return rule
        return None

    def allows(self, user: str | None, action: str, name: str, proxied: bool = False) -> bool:
        """Whether `user` (None: anonymous) may do `action` on repository `name`."""
        if proxied or under_prefix(name, self.proxy_prefix):
            return action == "pull" and self._admits(self.proxy_pull, user)
        rule = self.rule_for(name)
        if rule is None:
            return user is not None
        return self._admits(getattr(rule, action), user)

    def granted(self, user: str | None, name: str, wanted: list[str], proxied: bool) -> list[str]:
        """The subset of `wanted` actions `user` may do on `name` (for token scopes)."""
        return [a for a in wanted if a in ACTIONS and self.allows(user, a, name, proxied)]
