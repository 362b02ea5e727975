"""Config dataclass -> click options -> config dataclass: one field definition feeds a command's CLI.

:func:`option` declares a field with its help and CLI settings, :func:`nested` a field holding
another config dataclass (a component's config inside its owner's), :func:`click_options` /
:func:`click_params` turn a dataclass's fields into click options (nested ones flattened:
``--max-lora-rank``, not ``--engine-max-lora-rank``) and :func:`from_kwargs` builds the
dataclass tree back from click's keyword arguments (``__post_init__`` validates each level).
A setting has one name from the flag down: two leaves of one tree with the same name are
refused when the options are generated.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# ``path=`` kinds: an existing file, a directory (need not exist), a file to write.
PATH_KINDS = ("file", "dir", "out")


def option(default: Any = dataclasses.MISSING, help: str = "", *, envvar: str | None = None,
           choices: Sequence[str] | None = None, path: str | None = None, group: str | None = None,
           cli_name: str | None = None, default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose ``metadata`` holds its CLI settings (every key always present).

    ``cli_name`` overrides the ``--field-name`` flag; ``group`` is documentation only.
    A list/dict/set ``default`` is copied per instance (it becomes a ``default_factory``).
    """
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    meta = {"help": help, "envvar": envvar, "choices": tuple(choices) if choices else None, "path": path,
            "group": group, "cli_name": cli_name}
    if isinstance(default, (list, dict, set)):
        default, default_factory = dataclasses.MISSING, (lambda value=default: type(value)(value))
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def nested(cls: type, help: str = "") -> Any:
    """A field holding config dataclass ``cls`` (default ``cls()``); its fields become the
    owner's options, grouped under this field's name in the docs."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls, "help": help})


def leaf_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, type hint)`` of every option of ``cls``, nested configs flattened in
    declaration order. ValueError when two leaves share a name."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field, Any]] = []
    for f in dataclasses.fields(cls):
        out += leaf_fields(f.metadata["nested"]) if f.metadata.get("nested") else [(f, hints[f.name])]
    names = [f.name for f, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{cls.__name__}: settings declared twice in its config tree: {', '.join(twice)}")
    return out


def click_params(cls: type, *, defer_defaults: bool = False, envvar_prefix: str | None = None,
                 show_envvar: bool = True) -> list[Any]:
    """One ``click.Option`` per field of ``cls``, in declaration order.

    - ``--field-name`` (or ``cli_name``) stores into ``field_name``; ``X | None`` is typed as X;
      ``int``/``float`` -> INT/FLOAT; ``choices`` -> Choice; ``path`` -> click.Path; a list or
      tuple field takes ``A,B,...`` (split on commas, blanks dropped); anything else is a string.
    - ``bool`` is a plain ``--x`` flag, or ``--x/--no-x`` when unset must stay distinguishable
      (``bool | None``, a True default, or ``defer_defaults``).
    - Defaults go into the help text as ``[default: X]`` unless unset, empty, off or zero.
      With ``defer_defaults`` click's default is None for every option, so :func:`from_kwargs`
      can let lower-precedence sources (a config file) fill what the command line left unset.
    - The envvar is the field's ``envvar`` or ``envvar_prefix + FIELD_NAME``; ``show_envvar``
      lists it in the help.
    """
    import click

    return [click.Option(decls, **attrs)
            for decls, attrs in _option_specs(cls, defer_defaults, envvar_prefix, show_envvar)]


def click_options(cls: type, *, defer_defaults: bool = False, envvar_prefix: str | None = None,
                  show_envvar: bool = True) -> Callable[[F], F]:
    """Decorator form of :func:`click_params` for ``@click.command`` functions."""
    import click

    def decorate(func: F) -> F:
        for decls, attrs in reversed(_option_specs(cls, defer_defaults, envvar_prefix, show_envvar)):
            func = click.option(*decls, **attrs)(func)
        return func

    return decorate


def from_kwargs(cls: type[T], values: Mapping[str, Any], lower: Mapping[str, Any] | None = None) -> T:
    """``cls(...)`` from click's keyword arguments; keys that are not fields are ignored.

    A None value counts as unset: the field then takes its value from ``lower`` (values of
    lower-precedence sources, e.g. a config file) if there, else its dataclass default.
    Nested config fields are built from the same flat mapping (a key naming a nested
    field itself, rather than one of its leaves, is refused: it would be ignored).
    Validation errors from ``__post_init__`` propagate unchanged.
    """
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass by contract
        sub = f.metadata.get("nested")
        if sub:
            if values.get(f.name) is not None:
                raise TypeError(f"{cls.__name__}.{f.name} is a nested config: pass its fields by name")
            merged[f.name] = from_kwargs(sub, values, lower)
        elif values.get(f.name) is not None:
            merged[f.name] = values[f.name]
        elif lower and f.name in lower:
            merged[f.name] = lower[f.name]
    return cls(**merged)


def _option_specs(cls: type, defer: bool, envvar_prefix: str | None,
                  show_envvar: bool) -> list[tuple[list[str], dict[str, Any]]]:
    return [_option_spec(f, tp, defer, envvar_prefix, show_envvar) for f, tp in leaf_fields(cls)]


def _option_spec(f: dataclasses.Field, tp: Any, defer: bool, envvar_prefix: str | None,
                 show_envvar: bool) -> tuple[list[str], dict[str, Any]]:
    """(param decls, click.Option keyword arguments) for one field."""
    import click

    meta = f.metadata
    flag = meta.get("cli_name") or "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = None if default is dataclasses.MISSING else default
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    help = meta.get("help", "")
    if default not in (None, "", False, 0):  # unset, empty, off or zero: nothing worth showing
        help += f"  [default: {default}]"
    envvar = meta.get("envvar") or (envvar_prefix + f.name.upper() if envvar_prefix else None)
    attrs: dict[str, Any] = {"help": help, "default": None if defer else default, "envvar": envvar,
                             "show_envvar": show_envvar and envvar is not None}
    kind, optional = _unwrap(tp)
    if kind is bool:
        if defer or optional or default is True:
            return [f"{flag}/--no-{flag[2:]}", f.name], attrs
        return [flag, f.name], {**attrs, "is_flag": True}
    if meta.get("choices"):
        attrs["type"] = click.Choice(meta["choices"])
    elif meta.get("path"):
        attrs["type"] = {"file": click.Path(exists=True, dir_okay=False, path_type=Path),
                         "dir": click.Path(file_okay=False, path_type=Path),
                         "out": click.Path(dir_okay=False, path_type=Path)}[meta["path"]]
    elif kind in (list, tuple):
        attrs.update(type=click.STRING, metavar="A,B,...", callback=_split_commas)
    else:
        attrs["type"] = {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
    return [flag, f.name], attrs


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(runtime class, optional): ``int | None`` -> (int, True); ``list[str]`` -> (list, False)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return typing.get_origin(args[0]) or args[0], True
    return typing.get_origin(tp) or tp, False


def _split_commas(ctx: Any, param: Any, value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]
