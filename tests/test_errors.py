"""The error taxonomy: defaults, user rules by class or dotted name, MRO order, causes, groups."""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import types

import pytest
from prometheus_client import CollectorRegistry

from crowdmon import (
    CrowdmonSetupError,
    ErrorTaxonomy,
    PrometheusInstrumentation,
    classify_error,
    tracked_errors,
)
from tests.support import value


def foreign_exception(module: str, name: str, base: type[BaseException] = Exception) -> type[BaseException]:
    """An exception class as a third-party package defines it, without importing that package."""
    return types.new_class(name, (base,), {}, lambda namespace: namespace.update(__module__=module))


@pytest.mark.parametrize(
    ("error", "category"),
    [
        (PermissionError("no"), "auth"),
        (sqlite3.OperationalError("locked"), "database"),
        (sqlite3.IntegrityError("unique"), "database"),
        (TimeoutError(), "external_service"),
        (asyncio.TimeoutError(), "external_service"),
        (ConnectionRefusedError(), "external_service"),
        (ValueError("bad"), "validation"),
        (json.JSONDecodeError("bad", "{", 0), "validation"),
        (KeyError("k"), "system"),
        (RuntimeError("boom"), "system"),
    ],
    ids=lambda item: type(item).__name__ if isinstance(item, BaseException) else item,
)
def test_default_categories(error: BaseException, category: str) -> None:
    assert classify_error(error) == category


@pytest.mark.parametrize(
    ("module", "name", "category"),
    [
        ("sqlalchemy.exc", "SQLAlchemyError", "database"),
        ("asyncpg.exceptions", "PostgresError", "database"),
        ("openai._exceptions", "OpenAIError", "ai_system"),
        ("httpx._exceptions", "HTTPError", "external_service"),
        ("jwt.exceptions", "PyJWTError", "auth"),
        ("pydantic_core._pydantic_core", "ValidationError", "validation"),
    ],
)
def test_third_party_defaults_match_by_dotted_name_without_importing_the_package(module: str, name: str, category: str) -> None:
    cls = foreign_exception(module, name)
    subclass = types.new_class("Specific" + name, (cls,), {}, lambda ns: ns.update(__module__=module))

    assert classify_error(cls()) == category
    assert classify_error(subclass()) == category
    # The same class name elsewhere does not match.
    assert classify_error(foreign_exception("myapp.errors", name)()) == "system"


def test_user_rules_by_class_and_by_dotted_name() -> None:
    class QuotaExceeded(Exception):
        pass

    api_error = foreign_exception("openai._exceptions", "APIError")
    taxonomy = ErrorTaxonomy({QuotaExceeded: "ai_system", "openai.APIError": "external_service"})

    assert taxonomy.classify(QuotaExceeded()) == "ai_system"
    assert taxonomy.classify(api_error()) == "external_service"


def test_a_dotted_name_rule_matches_a_nested_class_by_its_enclosing_classes() -> None:
    inner = types.new_class("Inner", (Exception,), {}, lambda ns: ns.update(__module__="stripe._error", __qualname__="StripeError.Inner"))
    elsewhere = types.new_class("Inner", (Exception,), {}, lambda ns: ns.update(__module__="stripe._error", __qualname__="Other.Inner"))
    taxonomy = ErrorTaxonomy({"stripe.StripeError.Inner": "external_service"})

    assert taxonomy.classify(inner()) == "external_service"  # in a submodule, as for any rule
    assert taxonomy.classify(elsewhere()) == "system"
    assert ErrorTaxonomy({"stripe._error.StripeError.Inner": "database"}).classify(inner()) == "database"


def test_first_match_along_the_mro_wins_and_user_rules_beat_defaults() -> None:
    class StorageError(Exception):
        pass

    class LockTimeout(StorageError, TimeoutError):
        pass

    taxonomy = ErrorTaxonomy([(StorageError, "database")])
    # LockTimeout -> StorageError (database) comes before TimeoutError in the MRO.
    assert taxonomy.classify(LockTimeout()) == "database"

    taxonomy.add_rule(TimeoutError, "system")
    assert taxonomy.classify(TimeoutError()) == "system"
    assert ErrorTaxonomy().classify(TimeoutError()) == "external_service"
    assert ErrorTaxonomy(defaults=False).classify(PermissionError()) == "system"


def test_cause_is_followed_when_the_error_itself_matches_no_rule() -> None:
    class ServiceFailed(Exception):
        pass

    try:
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.Error as error:
            raise ServiceFailed("could not save") from error
    except ServiceFailed as failure:
        caught = failure

    assert classify_error(caught) == "database"
    # A rule for the outer error itself wins over its cause.
    assert ErrorTaxonomy({ServiceFailed: "session"}).classify(caught) == "session"


def test_exception_group_leaves_are_classified() -> None:
    group_type = builtins.ExceptionGroup  # Python 3.11+
    group = group_type("parallel calls", [KeyError("a"), group_type("inner", [PermissionError("no")])])
    assert classify_error(group) == "auth"
    assert classify_error(group_type("none", [KeyError("a")])) == "system"


@pytest.mark.parametrize(
    ("target", "category", "message"),
    [
        (KeyError, "network", "unknown error category 'network'; use one of: auth, database"),
        ("SQLAlchemyError", "database", "dotted class name"),
        (42, "database", "exception class or a dotted class name"),
        (int, "database", "exception class or a dotted class name"),
    ],
)
def test_bad_rules_fail_with_the_fix(target: object, category: str, message: str) -> None:
    with pytest.raises(CrowdmonSetupError) as raised:
        ErrorTaxonomy().add_rule(target, category)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_exception_label_is_the_class_name_never_the_message(
    registry: CollectorRegistry, instrumentation: PrometheusInstrumentation
) -> None:
    @tracked_errors(component="auth0", instrumentation=instrumentation)
    def login(email: str) -> None:
        raise PermissionError(f"{email} has no account")

    for email in ("ann@example.com", "bob@example.com"):
        with pytest.raises(PermissionError):
            login(email)

    text = "\n".join(
        f"{sample.name}{sample.labels}" for family in registry.collect() for sample in family.samples
    )
    assert "example.com" not in text
    assert value(registry, "auth_errors_total", component="auth0", exception="PermissionError") == 2


def test_exception_class_names_are_bounded_by_the_cardinality_guard() -> None:
    registry = CollectorRegistry()
    instrumentation = PrometheusInstrumentation(registry, cardinality_caps={"database_errors_total:exception": 3})

    @tracked_errors(component="db", error_type="database", instrumentation=instrumentation)
    def fail(cls: type[Exception]) -> None:
        raise cls()

    for index in range(10):
        with pytest.raises(Exception):  # noqa: B017 - ten generated classes
            fail(type(f"GeneratedError{index}", (Exception,), {}))

    assert instrumentation.guard.distinct_values("database_errors_total", "exception") == 3
    assert value(registry, "database_errors_total", component="db", exception="<other>") == 7
    assert value(registry, "crowdmon_label_overflow_total", metric="database_errors_total", label="exception") == 7


@pytest.mark.parametrize("rule", [ValueError, "builtins.ValueError"])
def test_a_user_rule_beats_a_default_for_the_same_class_however_either_is_given(rule: object) -> None:
    # The defaults classify ValueError as a class and TimeoutError by name or class; the user's
    # rule for the same class wins, given as a class or as a dotted name.
    assert ErrorTaxonomy().classify(ValueError()) == "validation"
    assert ErrorTaxonomy({rule: "system"}).classify(ValueError("bad")) == "system"
    assert ErrorTaxonomy({"builtins.TimeoutError": "ai_system"}).classify(TimeoutError()) == "ai_system"
    # A later rule replaces an earlier one for the same target; a rule for a base class still
    # loses to a rule for the class itself.
    taxonomy = ErrorTaxonomy({"builtins.ValueError": "system"})
    taxonomy.add_rule(ValueError, "database")
    assert taxonomy.classify(ValueError()) == "database"
    assert ErrorTaxonomy({Exception: "database"}).classify(ValueError()) == "validation"
