"""The error taxonomy: which ``error_type`` an exception is counted under.

Rules map an exception class, or a dotted class name, to a category.  A dotted name matches a class
of that name defined in that module or any submodule of it, so ``"openai.APIError"`` matches
``openai._exceptions.APIError`` and neither package needs to be importable.  The first match along
the exception's MRO wins (a user rule beats a default for the same class).  An exception no rule
matches is classified by its ``__cause__`` and then by the leaves of an ``ExceptionGroup``; what is
still unmatched is ``system``.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from crowdmon.catalogue import ERROR_TYPES
from crowdmon.timing import is_exception_group

#: The category of an exception no rule matches.
FALLBACK_CATEGORY = "system"

RuleTarget = type[BaseException] | str

#: The defaults, most of them by dotted name so that no third-party package is imported.
DEFAULT_RULES: tuple[tuple[RuleTarget, str], ...] = (
    (PermissionError, "auth"),
    ("jwt.PyJWTError", "auth"),
    ("jose.JOSEError", "auth"),
    ("authlib.AuthlibBaseError", "auth"),
    (sqlite3.Error, "database"),
    ("sqlalchemy.SQLAlchemyError", "database"),
    ("asyncpg.PostgresError", "database"),
    ("psycopg.Error", "database"),
    ("psycopg2.Error", "database"),
    ("pymongo.PyMongoError", "database"),
    ("redis.RedisError", "database"),
    (TimeoutError, "external_service"),
    (asyncio.TimeoutError, "external_service"),
    (ConnectionError, "external_service"),
    ("httpx.HTTPError", "external_service"),
    ("requests.RequestException", "external_service"),
    ("aiohttp.ClientError", "external_service"),
    ("openai.OpenAIError", "ai_system"),
    ("anthropic.AnthropicError", "ai_system"),
    ("langchain_core.LangChainException", "ai_system"),
    ("itsdangerous.BadSignature", "session"),
    ("pydantic_core.ValidationError", "validation"),
    ("pydantic.ValidationError", "validation"),
    ("jsonschema.ValidationError", "validation"),
    (ValueError, "validation"),
)


class ErrorTaxonomy:
    """Classifies exceptions into the ``error_type`` categories by rules held as data."""

    def __init__(
        self,
        rules: Mapping[Any, str] | Iterable[tuple[RuleTarget, str]] = (),
        *,
        defaults: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        # Each rule carries the order it was added in: at one step of a class's MRO, a rule
        # given by name and one given as the class both match, and the later one (the user's
        # over a default) wins.
        self._added = itertools.count()
        self._by_class: dict[type[BaseException], tuple[int, str]] = {}
        # qualname -> [(module prefix, order, category)], latest first
        self._by_name: dict[str, list[tuple[str, int, str]]] = {}
        self._cache: dict[type[BaseException], str | None] = {}
        if defaults:
            for target, category in DEFAULT_RULES:
                self.add_rule(target, category)
        items = rules.items() if isinstance(rules, Mapping) else rules
        for item in items:
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
                raise _setup_error(
                    "rules take a mapping or (target, category) pairs such as "
                    f"('openai.APIError', 'external_service'), got {item!r}"
                )
            self.add_rule(*item)

    def add_rule(self, target: RuleTarget, category: str) -> None:
        """Classify ``target`` (a class, or a dotted name such as ``"openai.APIError"``) and its
        subclasses as ``category``; a later rule for the same target replaces the earlier one."""
        if category not in ERROR_TYPES:
            raise _setup_error(
                f"unknown error category {category!r}; use one of: {', '.join(ERROR_TYPES)}"
            )
        with self._lock:
            if isinstance(target, type) and issubclass(target, BaseException):
                self._by_class[target] = (next(self._added), category)
            elif isinstance(target, str) and "." in target.strip(".") and " " not in target:
                module, _, name = target.rpartition(".")
                entries = [entry for entry in self._by_name.get(name, []) if entry[0] != module]
                self._by_name[name] = [(module, next(self._added), category), *entries]
            else:
                raise _setup_error(
                    f"an error rule needs an exception class or a dotted class name such as "
                    f"'sqlalchemy.exc.SQLAlchemyError', got {target!r}"
                )
            self._cache.clear()

    def classify(self, error: BaseException) -> str:
        """The category of ``error``: its own class first, then its cause, then group leaves."""
        for candidate in _candidates(error):
            category = self._match(type(candidate))
            if category is not None:
                return category
        return FALLBACK_CATEGORY

    def _match(self, cls: type[BaseException]) -> str | None:
        try:
            return self._cache[cls]
        except KeyError:
            pass
        found: str | None = None
        for klass in cls.__mro__:
            by_class, by_name = self._by_class.get(klass), self._match_name(klass)
            if by_class is not None or by_name is not None:
                found = max(rule for rule in (by_class, by_name) if rule is not None)[1]
                break
        with self._lock:
            if len(self._cache) < 4096:
                self._cache[cls] = found
        return found

    def _match_name(self, klass: type) -> tuple[int, str] | None:
        enclosing, _, name = klass.__qualname__.rpartition(".")
        entries = self._by_name.get(name)
        if not entries:
            return None
        module = klass.__module__
        for prefix, added, category in entries:
            package = prefix
            if enclosing:  # a nested class: the rule names its enclosing classes after the module
                if not prefix.endswith("." + enclosing):
                    continue
                package = prefix[: -len(enclosing) - 1]
            if module == package or module.startswith(package + "."):
                return added, category
        return None


def _setup_error(message: str) -> Exception:
    from crowdmon.instrumentation import CrowdmonSetupError  # defined after this module loads

    return CrowdmonSetupError(message)


def _candidates(error: BaseException) -> Iterator[BaseException]:
    """``error``, then its ``__cause__`` chain, then the leaves of any exception group met."""
    seen: set[int] = set()
    pending = [error]
    while pending and len(seen) < 64:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            pending.insert(0, current.__cause__)
        if is_exception_group(current):
            nested = getattr(current, "exceptions", ())
            pending.extend(nested if isinstance(nested, tuple) else ())


#: The taxonomy decorators and ``track_application_error`` use unless given another.
default_taxonomy = ErrorTaxonomy()


def add_error_rule(target: RuleTarget, category: str) -> None:
    """Add a rule to the default taxonomy: ``add_error_rule("openai.APIError", "ai_system")``."""
    default_taxonomy.add_rule(target, category)


def classify_error(error: BaseException) -> str:
    """The ``error_type`` the default taxonomy gives ``error``."""
    return default_taxonomy.classify(error)
