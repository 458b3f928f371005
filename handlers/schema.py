"""The JSON request format of the bookrec endpoint: pydantic models, their JSON Schema, and parsing.

The pydantic classes below are the one statement of the contract: ``parse_request`` validates with
them and ``request_schema`` (published as ``docs/request.schema.json``) is generated from them.
A valid body becomes a ``RateBody``, ``RecommendBody`` or ``SimilarBody``, the very objects the engine scores; anything
else raises ``RequestError`` carrying a ``Refusal`` that names the offending field as a JSON path, so
every bad input becomes a 4xx with a JSON body and never reaches the model. Catalog look-ups
(unknown ISBN or user id -> 404) run inside the same validation, through the validation context.

    python -m handlers.schema                                  # print the JSON Schema
    python -m handlers.schema --write docs/request.schema.json  # regenerate the published copy
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from model.isbn import normalise_isbn
from model.ranges import AGE_MAX, AGE_MIN, RATING_MAX, RATING_MIN, YEAR_MAX, YEAR_MIN

ACTIONS = ("rate", "recommend", "similar")
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


@dataclass(frozen=True)
class Refusal:
    """A request the endpoint does not answer: HTTP status, the JSON path of the field (None when no
    field is to blame) and what is wrong."""

    status: int
    field: str | None
    message: str

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}

    def result(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body), as the engine answers."""
        return self.status, self.body()


INTERNAL_ERROR = Refusal(500, None, "internal error; see the model log")


class RequestError(Exception):
    """Raised by parsing for a body it refuses; ``refusal`` says how."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.refusal = Refusal(status, field, message)


# ---------------------------------------------------------------------------- field types
@dataclass(frozen=True)
class Limited:
    """At most ``Limits.<name>``: characters of a string, items of a list, or an integer's value.

    The request's ``Limits`` arrive in the validation context (an archive may configure its own);
    the JSON Schema states the defaults. Checked before the value itself, so an over-long list is
    refused without validating its items.
    """

    name: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_before_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        key = {"string": "maxLength", "array": "maxItems", "integer": "maximum"}[out["type"]]
        return {**out, key: getattr(Limits(), self.name)}

    def _check(self, value: Any, info: ValidationInfo) -> Any:
        limit = getattr((info.context or {}).get("limits") or Limits(), self.name)
        if isinstance(value, str) and len(value) > limit:
            raise PydanticCustomError(
                "too_long", "is too long: {length} characters, at most {limit}", {"length": len(value), "limit": limit}
            )
        if isinstance(value, list) and len(value) > limit:
            raise PydanticCustomError(
                "too_long", "has {length} items, at most {limit} are allowed", {"length": len(value), "limit": limit}
            )
        if type(value) is int and value > limit:
            raise PydanticCustomError("too_large", "must be at most {limit}", {"limit": limit})
        return value


def _unicode(value: Any) -> Any:
    """Refuse lone UTF-16 surrogates (``"\\ud800"`` is valid JSON): they are not text, and would
    fail later in the tokenizer or when the answer is encoded."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "string_unicode", "holds a lone UTF-16 surrogate at character {position}", {"position": err.start}
        ) from None
    return value


def _catalog_isbn(isbn: str, info: ValidationInfo) -> str:
    known = (info.context or {}).get("known_isbn")
    if known is not None and not known(isbn):
        raise PydanticCustomError(
            "unknown_isbn", "unknown ISBN {isbn}: not in the model's catalog", {"isbn": _preview(isbn)}
        )
    return isbn


def _catalog_user(user_id: int, info: ValidationInfo) -> int:
    known = (info.context or {}).get("known_user")
    if known is not None and not known(user_id):
        raise PydanticCustomError(
            "unknown_user",
            "unknown user id {user_id}; describe a new user by city/region/country/age",
            {"user_id": user_id},
        )
    return user_id


# Checks run outside in: the surrogate check, then the length limit, then the type and pattern.
Text = Annotated[str, Limited("max_string"), BeforeValidator(_unicode)]
NonBlankText = Annotated[str, Field(pattern=r"\S"), Limited("max_string"), BeforeValidator(_unicode)]
# Normalised as training normalised the catalog's ISBNs, so '000000006x' finds '000000006X'.
Isbn = Annotated[
    str,
    Field(pattern=r"\S", max_length=MAX_ISBN_CHARS, description="an ISBN of the catalog"),
    AfterValidator(normalise_isbn),
    AfterValidator(_catalog_isbn),
    BeforeValidator(_unicode),
]


# ------------------------------------------------------------------------------------ models
class _Body(BaseModel):
    """Strict JSON: no coercion (``"30"`` or ``true`` is not a number, 30.5 not an integer), no NaN
    or Infinity, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # extra="forbid" states the rule (and the schema's additionalProperties); this names the
        # allowed fields in the error.
        if isinstance(data, dict):
            extra = sorted(str(key) for key in data if key not in cls.model_fields)
            if extra:
                raise PydanticCustomError(
                    "unknown_field",
                    "is not a known field ({allowed})",
                    {"field": extra[0], "allowed": _allowed_fields(cls)},
                )
        return data


class RatedBook(_Body):
    """A catalog book a user rated (a new user, or a known one since the model was built)."""

    isbn: Isbn
    rating: Annotated[float, Field(ge=RATING_MIN, le=RATING_MAX)]


class KnownUser(_Body):
    """A user of the model's catalog, with the catalog books they rated since the model was built
    (optional: used with their catalog history, as a new user's ratings are)."""

    # Which kind the engine scores (users and books alike); a class constant, not a JSON field.
    known: ClassVar[bool] = True

    user_id: Annotated[int, AfterValidator(_catalog_user)]
    ratings: Annotated[list[RatedBook], Field(min_length=1), Limited("max_ratings")] = []


class NewUser(_Body):
    """A user the model has not seen, described by any of these fields."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})
    known: ClassVar[bool] = False

    city: Text | None = None
    region: Text | None = None
    country: Text | None = None
    age: Annotated[int, Field(ge=AGE_MIN, le=AGE_MAX)] | None = None
    ratings: Annotated[list[RatedBook], Field(min_length=1), Limited("max_ratings")] = []

    @model_validator(mode="after")
    def _not_empty(self) -> NewUser:
        if not self.model_fields_set:  # the schema's minProperties
            raise PydanticCustomError(
                "empty_user", "must hold a user_id, or describe a new user (city, region, country, age)"
            )
        return self


class CatalogBook(_Body):
    """A catalog book as an object."""

    known: ClassVar[bool] = True

    isbn: Isbn

    @classmethod
    def of(cls, isbn: str) -> CatalogBook:
        """The book of an ISBN already validated as a bare string (not validated again)."""
        return cls.model_construct(isbn=isbn)


class NewBook(_Body):
    """A book the model has not seen, described by its metadata."""

    known: ClassVar[bool] = False

    title: NonBlankText
    author: Text | None = None
    year: Annotated[int, Field(ge=YEAR_MIN, le=YEAR_MAX)] | None = None
    publisher: Text | None = None


# Objects that share a place in a request. Which one a body is depends on a field the client may
# have misspelt ({"id": 103} reads as a new user), so an unknown field's hint names the fields of each.
_ALTERNATIVES: tuple[dict[type[_Body], str], ...] = (
    {KnownUser: "a known user", NewUser: "a new user"},
    {CatalogBook: "a catalog book", NewBook: "a new book"},
)


def _allowed_fields(model: type[_Body]) -> str:
    """The fields an object in ``model``'s place may hold, for an unknown field's message."""
    for shapes in _ALTERNATIVES:
        if model in shapes:
            return "; ".join(f"{noun}: {', '.join(sorted(m.model_fields))}" for m, noun in shapes.items())
    return f"allowed: {', '.join(sorted(model.model_fields))}"


def _user_kind(value: Any) -> str:
    return "known_user" if isinstance(value, dict) and "user_id" in value else "new_user"


def _book_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "catalog_isbn"
    if isinstance(value, dict):
        return "catalog_book" if "isbn" in value else "new_book"
    return None


# Union members carry a tag, which pydantic puts into an error's location; a field path leaves it out.
_TAGS = frozenset({*ACTIONS, "known_user", "new_user", "catalog_isbn", "catalog_book", "new_book"})

User = Annotated[
    Annotated[KnownUser, Tag("known_user")] | Annotated[NewUser, Tag("new_user")],
    Discriminator(_user_kind),
]
# A book is an ISBN string, a catalog book's object or a new book's: the string is validated as
# such (an error names ``books[0]``) and then becomes a ``CatalogBook``, so the engine sees two kinds.
Book = Annotated[
    Annotated[Isbn, AfterValidator(CatalogBook.of), Tag("catalog_isbn")]
    | Annotated[CatalogBook, Tag("catalog_book")]
    | Annotated[NewBook, Tag("new_book")],
    Discriminator(
        _book_kind,
        custom_error_type="book_type",
        custom_error_message="must be an ISBN string, an object with an isbn, or a new book's object with a title",
    ),
]


class RateBody(_Body):
    """Predict the user's rating of each book."""

    action: Literal["rate"]
    user: User
    books: Annotated[list[Book], Field(min_length=1), Limited("max_books")]


class RecommendBody(_Body):
    """The user's top-k catalog books."""

    action: Literal["recommend"]
    user: User
    k: Annotated[int, Field(ge=1), Limited("max_k")] = DEFAULT_K
    exclude_rated: bool = True


class SimilarBody(_Body):
    """The k catalog books most like one book: a catalog book (ISBN) or a new book's metadata."""

    action: Literal["similar"]
    book: Book
    k: Annotated[int, Field(ge=1), Limited("max_k")] = DEFAULT_K


Request = RateBody | RecommendBody | SimilarBody
RequestBody = Annotated[Request, Field(discriminator="action")]
_ADAPTER: TypeAdapter[Request] = TypeAdapter(RequestBody)


# ------------------------------------------------------------------------------------ parsing
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


def parse_request(
    body: Any,
    limits: Limits,
    known_isbn: Callable[[str], bool],
    known_user: Callable[[int], bool],
) -> Request:
    """Validate one request body (raw bytes/str or already-decoded JSON) into a typed request."""
    value = decode_body(body)
    context = {"limits": limits, "known_isbn": known_isbn, "known_user": known_user}
    try:
        return _ADAPTER.validate_python(value, context=context)
    except ValidationError as err:
        raise _request_error(err.errors(include_url=False)[0]) from None


_STATUS = {"unknown_isbn": 404, "unknown_user": 404}
# Pydantic's wording where the API's is clearer (formatted with the error's context).
_MESSAGES = {
    "missing": "is required",
    "string_pattern_mismatch": "must not be empty or blank",
    "string_too_long": "is too long: at most {max_length} characters",
    "list_type": "must be a JSON array",
    "too_short": "has {actual_length} items, at least {min_length} required",
}
# Errors whose message already says all; the others get the offending value appended.
_COMPLETE = {"missing", "unknown_field", "empty_user", "unknown_isbn", "unknown_user", "too_long", "too_short"}


def _request_error(error: Mapping[str, Any]) -> RequestError:
    """The first pydantic error as the endpoint's error: a JSON path and a message naming the problem."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _TAGS:
            path += f".{part}"
    if kind == "unknown_field":
        path += f".{ctx['field']}"
    path = path.lstrip(".")
    if kind in ("union_tag_not_found", "union_tag_invalid"):  # the action selects the request model
        if not isinstance(value, dict) or "action" not in value:
            return RequestError(400, "action", f"is required: one of {', '.join(ACTIONS)}")
        return RequestError(400, "action", f"must be one of {', '.join(ACTIONS)}, got {_preview(value['action'])}")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return RequestError(400, path or "body", f"must be a JSON object, got {type(value).__name__} {_preview(value)}")
    message = _MESSAGES[kind].format(**ctx) if kind in _MESSAGES else error["msg"]
    if message.startswith("Input should"):
        message = "must" + message[len("Input should") :]
    if kind not in _COMPLETE:
        message += f", got {_preview(value)}"
    return RequestError(_STATUS.get(kind, 400), path or "body", message)


# ---------------------------------------------------------------------------------- JSON Schema
class _SchemaGenerator(GenerateJsonSchema):
    """Draft 2020-12 with the dialect and a title at the top and no per-property titles."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def generate(self, schema: core_schema.CoreSchema, mode: Any = "validation") -> JsonSchemaValue:
        out = super().generate(schema, mode)
        return {"$schema": self.schema_dialect, "title": "bookrec request", **out}


def request_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a request body with the default ``Limits``; ``parse_request``
    enforces it plus the catalog look-ups (unknown ISBN / user id -> 404)."""
    return _ADAPTER.json_schema(schema_generator=_SchemaGenerator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print or write the JSON Schema of a bookrec request.")
    parser.add_argument("--write", type=Path, metavar="PATH", help="write it to PATH instead of printing it")
    args = parser.parse_args(argv)
    text = json.dumps(request_schema(), indent=2) + "\n"
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
