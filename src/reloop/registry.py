"""One registry per kind of component, one strict options base, one way to write a choice in YAML.

Every component kind (``update``, ``loss``, ``generator``, ``memory``, ``model``) has one
:class:`Registry`. A component declares its ``name`` and a pydantic ``Options`` class (a :class:`Strict`
subclass) beside its class, and joins the registry with a decorator::

    @UPDATES.register("batch")
    class BatchWindow(UpdateStrategy):
        class Options(Strict):
            shorthand: ClassVar[str] = "window"  # `{batch: 3}` is `{batch: {window: 3}}`
            window: int = 3

A config names a component in one of three YAML forms, parsed once (:meth:`Registry.parse`) into a typed
:class:`Choice` (the name and its validated options):

- a bare name: ``update: incremental`` (every option at its default; ``null`` means ``Registry.empty``);
- a one-key mapping to the options: ``generator: {asmg_gru: {k: 3}}`` (``null``: the defaults);
- a one-key mapping to the shorthand option's value: ``update: {batch: 3}``; a *flat* kind (``loss``) also
  takes further options beside the name: ``loss: {self_correction: 0.1, scale: normalized}``.

Problems name their dotted path inside the slot (``replay.ratio``, ``scale`` for a flat option); the
config roots them at the run (``runs.IU.update.replay.ratio: ...``) through :func:`reloop.errors.format_errors`.
A :class:`Choice` dumps back to the YAML form it was written in, so configs, checkpoint fingerprints and
``tuned.yaml`` keep the user's spelling. The slot types of a config (:meth:`Registry.slot`) look names up
when a config is validated, so a component registered later is accepted without editing the config module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from reloop.errors import ConfigError, problems_of

T = TypeVar("T")

#: A problem found while parsing a slot: (dotted path inside the slot, "" for the slot itself; message).
Problem = tuple[str, str]


class Strict(BaseModel):
    """The one strict base of every options and config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    #: The option a scalar stands for in the one-key form (``{batch: 3}`` -> ``window: 3``); ``None``: none.
    shorthand: ClassVar[str | None] = None
    #: Candidate values ``reloop tune`` tries on the valid periods (keys: YAML option names).
    search_space: ClassVar[dict[str, list[Any]]] = {}


class NoOptions(Strict):
    """The options of a component that takes none."""


# --------------------------------------------------------------------------------------------------
# option fields with the messages the configs document


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def number(what: str, ok: Callable[[float], bool]) -> BeforeValidator:
    """A float option: a YAML number (booleans are not numbers) with ``ok(x)``; else
    ``expected <what>, got <value>``."""

    def check(x: Any) -> float:
        if not _is_number(x) or not ok(x):
            raise ValueError(f"expected {what}, got {x!r}")
        return float(x)

    return BeforeValidator(check)


def integer(what: str, ok: Callable[[int], bool]) -> BeforeValidator:
    """An integer option (booleans are not integers); else ``expected <what>, got <value>``."""

    def check(x: Any) -> int:
        if isinstance(x, bool) or not isinstance(x, int) or not ok(x):
            raise ValueError(f"expected {what}, got {x!r}")
        return x

    return BeforeValidator(check)


def one_of(*values: str) -> BeforeValidator:
    """A string option among ``values``; else ``expected 'a', 'b' or 'c', got <value>``."""
    quoted = [repr(v) for v in values]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"

    def check(x: Any) -> str:
        if x not in values:
            raise ValueError(f"expected {listed}, got {x!r}")
        return str(x)

    return BeforeValidator(check)


UNIT = number("a number in [0, 1]", lambda x: 0.0 <= x <= 1.0)
POSITIVE = number("a number > 0", lambda x: x > 0.0)


# --------------------------------------------------------------------------------------------------


def _message(problems: list[Problem], where: str) -> str:
    return "; ".join(f"{where}.{p}: {m}" if p else f"{where}: {m}" for p, m in problems)


class Choice(Generic[T]):
    """A parsed slot value: the registered ``name``, its validated ``options``, the ``raw`` YAML form.

    Immutable. Equal to another choice of the same kind, name and options, and to any YAML value that
    parses to it (``spec.loss == "distill"``).
    """

    __slots__ = ("registry", "name", "options", "raw")

    def __init__(self, registry: Registry[T], name: str, options: Strict, raw: Any) -> None:
        object.__setattr__(self, "registry", registry)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "raw", raw)

    registry: Registry[T]
    name: str
    options: Strict
    raw: Any

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a Choice is immutable")

    @property
    def cls(self) -> type[T]:
        return self.registry[self.name]

    def build(self, **context: Any) -> T:
        """The component, from the options validated when the choice was parsed (not validated again)."""
        return self.registry.build(self, **context)

    def _key(self) -> tuple[str, str, str]:
        return self.registry.kind, self.name, self.options.model_dump_json()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Choice):
            try:
                other = self.registry.parse(other)
            except (ValueError, TypeError):
                return False
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Choice({self.registry.kind}={self.raw!r})"

    def __copy__(self) -> Choice[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Choice[T]:
        return self

    def __reduce__(self) -> tuple[Callable[[str, Any], Choice[Any]], tuple[str, Any]]:
        return _unpickle, (self.registry.kind, self.raw)


def _unpickle(kind: str, raw: Any) -> Choice[Any]:
    return Registry.of(kind).parse(raw)


class Registry(Mapping[str, type[T]]):
    """The components of one ``kind``: name -> class (a read-only mapping in registration order).

    Args:
        kind: the slot it fills (``update``); used in messages and as the default ``where``.
        flat: whether options may also sit beside the name (``loss: {distill: 0.3, temperature: 2}``).
        empty: the name a ``null`` value stands for (``generator: null`` is ``identity``); ``None``: refused.
    """

    _kinds: ClassVar[dict[str, Registry[Any]]] = {}

    def __init__(self, kind: str, flat: bool = False, empty: str | None = None) -> None:
        self.kind, self.flat, self.empty = kind, flat, empty
        self._classes: dict[str, type[T]] = {}
        Registry._kinds[kind] = self

    @classmethod
    def of(cls, kind: str) -> Registry[Any]:
        """The registry of ``kind`` (``update``, ``loss``, ...)."""
        return cls._kinds[kind]

    @classmethod
    def kinds(cls) -> dict[str, Registry[Any]]:
        """Every registry, by kind (what the contract suite enumerates)."""
        return dict(cls._kinds)

    # --- the mapping ---------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {list(self._classes)})"

    def names(self) -> list[str]:
        """The registered names, sorted (as messages list them)."""
        return sorted(self._classes)

    # --- registration --------------------------------------------------------------------------------

    def register(self, name: str | None = None) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@registry.register("name")`` makes the class available under ``name`` (set
        as its ``name``); ``@registry.register()`` uses the class's own ``name``. The class must declare a
        :class:`Strict` ``Options``; a name is registered once."""

        def add(cls: type[T]) -> type[T]:
            key = name if name is not None else getattr(cls, "name", "")
            if not key:
                raise ValueError(f"{cls.__name__}: no {self.kind} name to register")
            options = getattr(cls, "Options", None)
            if not (isinstance(options, type) and issubclass(options, BaseModel)):
                raise TypeError(f"{cls.__name__}: a {self.kind} needs a pydantic Options class")
            if key in self._classes and self._classes[key] is not cls:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._classes[key].__name__})")
            if name is not None:
                type.__setattr__(cls, "name", name)
            self._classes[key] = cls
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a temporary component)."""
        del self._classes[name]

    # --- parsing -------------------------------------------------------------------------------------

    def _unknown(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}; choose one of {self.names()}"

    def unknown(self, name: object, where: str | None = None) -> str:
        """The one message for a name that is not registered: ``<where>: unknown <kind> 'x'; choose one of [...]``."""
        return f"{where or self.kind}: {self._unknown(name)}"

    def options_class(self, name: str) -> type[Strict]:
        options: type[Strict] = getattr(self[name], "Options")  # noqa: B009 (checked by register)
        return options

    def validate_options(self, name: str, values: Mapping[str, Any], where: str | None = None) -> Strict:
        """``name``'s options from a mapping; problems name ``<where>.<key>``."""
        try:
            return self.options_class(name).model_validate(dict(values))
        except ValidationError as e:
            raise ConfigError(_message(problems_of(e), where or self.kind)) from None

    def _split(self, value: Any) -> tuple[str, Any, dict[str, Any]] | list[Problem]:
        """``value`` -> (name, the name's value, the options beside it), or the problem."""
        if value is None and self.empty is not None:
            value = self.empty
        if isinstance(value, str):
            return value, None, {}
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            name, *rest = value
            if rest and not self.flat:
                return [("", f"expected one {self.kind}, got {sorted(value)}")]
            return name, value[name], {k: value[k] for k in rest}
        return [("", f"expected a name or a one-key mapping, got {value!r}")]

    def _parse(self, value: Any) -> Choice[T] | list[Problem]:
        if isinstance(value, Choice):
            if value.registry is self:
                return value
            value = value.raw
        split = self._split(value)
        if isinstance(split, list):
            return split
        name, arg, beside = split
        if name not in self._classes:
            return [("", self._unknown(name))]
        options_cls = self.options_class(name)
        fields = list(options_cls.model_fields)
        source: dict[str, str] = {k: k for k in beside}  # option -> its path inside the slot
        values: dict[str, Any] = dict(beside)
        if isinstance(arg, Mapping):
            values.update(arg)
            source.update({k: f"{name}.{k}" for k in arg})
        elif arg is not None:
            if options_cls.shorthand is None:
                known = f"a mapping of options ({', '.join(fields)})" if fields else None
                problem = f"expected {known}, got {arg!r}" if known else f"takes no options, got {arg!r}"
                return [(name, problem)]
            values[options_cls.shorthand] = arg
            source[options_cls.shorthand] = name
        try:
            options = options_cls.model_validate(values)
        except ValidationError as e:
            out = []
            for path, msg in problems_of(e):
                head, dot, tail = path.partition(".")
                out.append((source.get(head, f"{name}.{head}" if head else name) + dot + tail, msg))
            return out
        raw = self.empty if value is None else copy.deepcopy(value)  # the choice owns its YAML form
        return Choice(self, name, options, raw)

    def parse(self, value: Any, where: str | None = None) -> Choice[T]:
        """A YAML value (a :class:`Choice` passes through) -> the typed :class:`Choice`.

        Raises:
            ConfigError: ``<where>.<path>: <problem>`` for every problem (``where`` defaults to the kind).
        """
        parsed = self._parse(value)
        if isinstance(parsed, list):
            raise ConfigError(_message(parsed, where or self.kind))
        return parsed

    def build(self, value: Any, where: str | None = None, **context: Any) -> T:
        """The component a YAML value or a :class:`Choice` describes: ``cls.from_options(options, **context)``
        with the options validated once, when the value was parsed."""
        choice = self.parse(value, where)
        built: T = getattr(choice.cls, "from_options")(choice.options, **context)  # noqa: B009
        return built

    def slot(self) -> Any:
        """The annotation of a config field holding one choice of this kind (validated from the YAML
        forms through this registry at validation time; dumped in the form it was written)."""
        return slot(Choice[T], self._parse, lambda c: c.raw)


X = TypeVar("X")


def slot(tp: Any, parse: Callable[[Any], X | list[Problem]], dump: Callable[[X], Any]) -> Any:
    """The annotation of a config field of type ``tp`` read by ``parse`` (a value or its problems, with
    paths inside the field) and written back by ``dump``; problems become one pydantic error whose
    context lists them, which :func:`reloop.errors.format_errors` roots at the field's dotted path."""

    def validate(value: Any) -> X:
        parsed = parse(value)
        if isinstance(parsed, list):
            message = "; ".join(f"{p}: {m}" if p else m for p, m in parsed)
            raise PydanticCustomError("component", "{message}", {"message": message, "problems": parsed})
        return parsed

    return Annotated[tp, PlainValidator(validate), PlainSerializer(dump, when_used="always")]
