"""A command group that imports a command's module only when the command line names it.

typer builds the click object of every command up front (each function's signature and type
hints, ~35 ms for vmorch's 60 commands) and the modules that define them must be imported first:
a run needs one command. '--help' and shell completion, which list every command, load them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup

#: a command's name -> "module:attribute", a typer.Typer (a group) or a command function
Where = dict[str, str]


def lazy_group(where: Where) -> type[TyperGroup]:
    """The group class (``typer.Typer(cls=...)``) whose commands, besides those registered on the
    app, are the ones ``where`` names, in its order."""

    class LazyGroup(TyperGroup):
        def __init__(self, *, commands: dict[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            markup = self.rich_markup_mode
            self.commands = LazyCommands(dict(commands or {}), where,
                                         lambda name, target: _click_command(name, target, markup))

        def list_commands(self, ctx: Any) -> list[str]:
            return list(self.commands)  # the names alone: TyperGroup's would build every command

    return LazyGroup


class LazyCommands(MutableMapping[str, Any]):
    """The click commands of a group: those built eagerly, then those of ``where``, each imported
    and built on first lookup."""

    def __init__(self, built: dict[str, Any], where: Where, build: Callable[[str, Any], Any]) -> None:
        self._built = built
        self._where = where
        self._build = build
        self._order = [*built, *(n for n in where if n not in built)]

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in self._where:
                raise KeyError(name)
            module, _, attribute = self._where[name].partition(":")
            self._built[name] = self._build(name, getattr(importlib.import_module(module), attribute))
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        if name not in self._order:
            self._order.append(name)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        raise TypeError("vmorch's commands are not removed")

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def _click_command(name: str, target: Any, rich_markup_mode: Any) -> Any:
    """``target`` (a typer.Typer, or a command function) as typer builds it under a root app: the
    same help rendering, with ``name``."""
    holder = typer.Typer(rich_markup_mode=rich_markup_mode, pretty_exceptions_enable=False, add_completion=False)
    holder.callback()(_no_options)  # a group, whatever it holds: its commands keep their names
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name=name)(target)
    return typer.main.get_group(holder).commands[name]


def _no_options() -> None:
    """Nothing: the holder of a command built alone."""
