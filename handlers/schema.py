"""The JSON request format of the bookrec endpoint: limits, validation and its JSON Schema.

Validation turns one request body into a typed ``RateRequest`` or ``RecommendRequest`` or raises
``RequestError`` naming the offending field, so every bad input becomes a 4xx with a JSON body and
never reaches the model. Catalog look-ups (unknown ISBN or user id) happen here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("rate", "recommend")
# Value ranges the training data was cleaned to (train/ingest.py), so a request stays in distribution.
AGE_RANGE = (5, 100)
YEAR_RANGE = (1000, 2030)
RATING_RANGE = (1.0, 10.0)
MAX_ISBN_CHARS = 32
DEFAULT_K = 10


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; overridable in the archive's model-config.yaml (``handler:`` section)."""

    max_books: int = 100  # books in one rate request
    max_ratings: int = 50  # {isbn, rating} pairs describing a new user
    max_k: int = 100
    max_string: int = 300  # characters of any free-text field

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> Limits:
        """Limits from a model-config ``handler`` mapping (unknown keys are ignored there)."""
        section = section or {}
        values = {name: int(section[name]) for name in cls.__dataclass_fields__ if name in section}
        return cls(**values)


class RequestError(Exception):
    """A request the handler refuses: HTTP status, the JSON path of the field and what is wrong."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclass
class UserSpec:
    """A known user (``user_id``) or a new one described by location, age and a few ratings."""

    user_id: int | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    age: int | None = None
    ratings: list[tuple[str, float]] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.user_id is not None


@dataclass
class BookSpec:
    """A catalog book (``isbn``) or a new one described by its metadata."""

    isbn: str | None = None
    title: str | None = None
    author: str | None = None
    year: int | None = None
    publisher: str | None = None

    @property
    def known(self) -> bool:
        return self.isbn is not None


@dataclass
class RateRequest:
    user: UserSpec
    books: list[BookSpec]
    action: str = "rate"


@dataclass
class RecommendRequest:
    user: UserSpec
    k: int = DEFAULT_K
    exclude_rated: bool = True
    action: str = "recommend"


Request = RateRequest | RecommendRequest


def _preview(value: Any, limit: int = 40) -> str:
    """A short repr of a bad value: error messages never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def decode_body(value: Any) -> Any:
    """The JSON value of a request body as TorchServe hands it over.

    TorchServe already parses ``application/json`` bodies (and falls back to the raw bytes when that
    fails); other content types arrive as bytes (or str for ``text/*``), parsed here strictly:
    UTF-8 only, and no NaN/Infinity literals.
    """
    if value is None:
        raise RequestError(400, "body", "expected a JSON request body (send it with Content-Type: application/json)")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(400, "body", f"is not valid UTF-8 (byte {err.start})") from None
    if isinstance(value, str):
        if not value.strip():
            raise RequestError(400, "body", "is empty; expected a JSON object")
        try:
            return json.loads(value, parse_constant=_reject_constant)
        except RecursionError:
            raise RequestError(400, "body", "is nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, NaN literals, over-long integers
            raise RequestError(400, "body", f"is not valid JSON: {str(err)[:120]}") from None
    return value


def _check_keys(obj: Mapping[str, Any], where: str, allowed: set[str], required: tuple[str, ...] = ()) -> None:
    for key in required:
        if key not in obj:
            raise RequestError(400, f"{where}.{key}".lstrip("."), "is required")
    extra = sorted(str(k) for k in obj if k not in allowed)
    if extra:
        raise RequestError(
            400, f"{where}.{extra[0]}".lstrip("."), f"is not a known field (allowed: {', '.join(sorted(allowed))})"
        )


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(400, where, f"must be a JSON object, got {type(value).__name__} {_preview(value)}")
    return value


def _int(value: Any, where: str, low: int, high: int, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    # bool is an int subclass in Python; JSON true/false is not a number here.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        null = " or null" if nullable else ""
        raise RequestError(400, where, f"must be an integer from {low} to {high}{null}, got {_preview(value)}")
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise RequestError(400, where, f"must be a finite number from {low:g} to {high:g}, got {_preview(value)}")
    return float(value)


def _string(value: Any, where: str, max_chars: int, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        null = " or null" if nullable else ""
        raise RequestError(400, where, f"must be a string{null}, got {type(value).__name__} {_preview(value)}")
    if len(value) > max_chars:
        raise RequestError(400, where, f"is too long: {len(value)} characters, at most {max_chars}")
    if not nullable and not value.strip():
        raise RequestError(400, where, "must not be empty")
    return value


def _list(value: Any, where: str, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise RequestError(400, where, f"must be a JSON array, got {type(value).__name__} {_preview(value)}")
    if not value:
        raise RequestError(400, where, "must not be empty")
    if len(value) > max_items:
        raise RequestError(400, where, f"has {len(value)} items, at most {max_items} are allowed")
    return value


def _isbn(value: Any, where: str, known: Callable[[str], bool]) -> str:
    isbn = _string(value, where, MAX_ISBN_CHARS, nullable=False)
    if not known(isbn):
        raise RequestError(404, where, f"unknown ISBN {_preview(isbn)}: not in the model's catalog")
    return isbn


def parse_user(
    value: Any, limits: Limits, known_isbn: Callable[[str], bool], known_user: Callable[[int], bool]
) -> UserSpec:
    """A known user ``{"user_id": 42}`` or a new one ``{"city", "region", "country", "age", "ratings"}``."""
    obj = _object(value, "user")
    if "user_id" in obj:
        _check_keys(obj, "user", {"user_id"})
        user_id = obj["user_id"]
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            raise RequestError(400, "user.user_id", f"must be an integer, got {_preview(user_id)}")
        if not known_user(user_id):
            raise RequestError(
                404, "user.user_id", f"unknown user id {user_id}; describe a new user by city/region/country/age"
            )
        return UserSpec(user_id=user_id)
    _check_keys(obj, "user", {"user_id", "city", "region", "country", "age", "ratings"})
    if not obj:
        raise RequestError(400, "user", "must hold a user_id, or describe a new user (city, region, country, age)")
    user = UserSpec(
        city=_string(obj.get("city"), "user.city", limits.max_string),
        region=_string(obj.get("region"), "user.region", limits.max_string),
        country=_string(obj.get("country"), "user.country", limits.max_string),
        age=_int(obj.get("age"), "user.age", *AGE_RANGE, nullable=True),
    )
    if "ratings" in obj:
        for i, item in enumerate(_list(obj["ratings"], "user.ratings", limits.max_ratings)):
            where = f"user.ratings[{i}]"
            pair = _object(item, where)
            _check_keys(pair, where, {"isbn", "rating"}, ("isbn", "rating"))
            isbn = _isbn(pair["isbn"], f"{where}.isbn", known_isbn)
            user.ratings.append((isbn, _number(pair["rating"], f"{where}.rating", *RATING_RANGE)))
    return user


def parse_book(value: Any, where: str, limits: Limits, known_isbn: Callable[[str], bool]) -> BookSpec:
    """A catalog ISBN (``"0345339703"`` or ``{"isbn": ...}``) or a new book ``{"title", ...}``."""
    if isinstance(value, str):
        return BookSpec(isbn=_isbn(value, where, known_isbn))
    obj = _object(value, where)
    if "isbn" in obj:
        _check_keys(obj, where, {"isbn"})
        return BookSpec(isbn=_isbn(obj["isbn"], f"{where}.isbn", known_isbn))
    _check_keys(obj, where, {"isbn", "title", "author", "year", "publisher"}, ("title",))
    return BookSpec(
        title=_string(obj["title"], f"{where}.title", limits.max_string, nullable=False),
        author=_string(obj.get("author"), f"{where}.author", limits.max_string),
        year=_int(obj.get("year"), f"{where}.year", *YEAR_RANGE, nullable=True),
        publisher=_string(obj.get("publisher"), f"{where}.publisher", limits.max_string),
    )


def parse_request(
    body: Any,
    limits: Limits,
    known_isbn: Callable[[str], bool],
    known_user: Callable[[int], bool],
) -> Request:
    """Validate one request body (raw bytes/str or already-decoded JSON) into a typed request."""
    obj = _object(decode_body(body), "body")
    action = obj.get("action")
    if action is None:
        raise RequestError(400, "action", f"is required: one of {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        raise RequestError(400, "action", f"must be one of {', '.join(ACTIONS)}, got {_preview(action)}")
    if action == "rate":
        _check_keys(obj, "", {"action", "user", "books"}, ("user", "books"))
        user = parse_user(obj["user"], limits, known_isbn, known_user)
        books = _list(obj["books"], "books", limits.max_books)
        return RateRequest(user, [parse_book(b, f"books[{i}]", limits, known_isbn) for i, b in enumerate(books)])
    _check_keys(obj, "", {"action", "user", "k", "exclude_rated"}, ("user",))
    user = parse_user(obj["user"], limits, known_isbn, known_user)
    k = _int(obj.get("k", DEFAULT_K), "k", 1, limits.max_k)
    exclude = obj.get("exclude_rated", True)
    if not isinstance(exclude, bool):
        raise RequestError(400, "exclude_rated", f"must be true or false, got {_preview(exclude)}")
    return RecommendRequest(user, k, exclude)


def request_schema(limits: Limits | None = None) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a request body; ``parse_request`` enforces the same rules
    plus the catalog look-ups (unknown ISBN / user id -> 404)."""
    limits = limits or Limits()
    text = {"type": ["string", "null"], "maxLength": limits.max_string}
    isbn = {"type": "string", "minLength": 1, "maxLength": MAX_ISBN_CHARS, "description": "an ISBN of the catalog"}
    rating_pair = {
        "type": "object",
        "properties": {
            "isbn": isbn,
            "rating": {"type": "number", "minimum": RATING_RANGE[0], "maximum": RATING_RANGE[1]},
        },
        "required": ["isbn", "rating"],
        "additionalProperties": False,
    }
    user = {
        "oneOf": [
            {
                "description": "a known user",
                "type": "object",
                "properties": {"user_id": {"type": "integer"}},
                "required": ["user_id"],
                "additionalProperties": False,
            },
            {
                "description": "a new user",
                "type": "object",
                "properties": {
                    "city": text,
                    "region": text,
                    "country": text,
                    "age": {"type": ["integer", "null"], "minimum": AGE_RANGE[0], "maximum": AGE_RANGE[1]},
                    "ratings": {"type": "array", "items": rating_pair, "minItems": 1, "maxItems": limits.max_ratings},
                },
                "minProperties": 1,
                "additionalProperties": False,
            },
        ]
    }
    book = {
        "oneOf": [
            isbn,
            {"type": "object", "properties": {"isbn": isbn}, "required": ["isbn"], "additionalProperties": False},
            {
                "description": "a new book",
                "type": "object",
                "properties": {
                    "title": {"type": "string", "minLength": 1, "maxLength": limits.max_string},
                    "author": text,
                    "year": {"type": ["integer", "null"], "minimum": YEAR_RANGE[0], "maximum": YEAR_RANGE[1]},
                    "publisher": text,
                },
                "required": ["title"],
                "additionalProperties": False,
            },
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "bookrec request",
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "action": {"const": "rate"},
                    "user": user,
                    "books": {"type": "array", "items": book, "minItems": 1, "maxItems": limits.max_books},
                },
                "required": ["action", "user", "books"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "action": {"const": "recommend"},
                    "user": user,
                    "k": {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": DEFAULT_K},
                    "exclude_rated": {"type": "boolean", "default": True},
                },
                "required": ["action", "user"],
                "additionalProperties": False,
            },
        ],
    }


if __name__ == "__main__":
    print(json.dumps(request_schema(), indent=2))
