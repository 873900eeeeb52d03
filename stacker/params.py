"""How a parameter is declared once: its default, its check, its documentation, its command-line form.

Every registry of stacker (extraction options, learner kinds, the ensemble's own
parameters) declares its parameters as :class:`Param` rows. The rest reads those rows:
:class:`stacker.Ensemble`'s signature, its validation and docstring, the cache keys, and
the command lines (an :class:`Option` per row that has one), so a new parameter is one row.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

__all__ = ["Option", "Param", "TABLE_DEFAULT", "comma_list"]

TABLE_DEFAULT = object()  # "the table's default" (a recipe may replace a default by None)


def comma_list(text: str) -> str:
    """``"a, b,c"`` -> ``"a,b,c"``: lists given on a command line may have spaces."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return ",".join(items)


@dataclass(frozen=True)
class Option:
    """One command-line option: what argparse needs, plus the Python parameter it sets.

    ``param`` names the parameter of :class:`stacker.Ensemble` (or the function called)
    when it differs from the option's name; :func:`~stacker.app.options.cli_terms` uses it to
    translate messages such as ``pass on_bad_image='skip'`` into ``pass --on-bad-image skip``.
    """

    flags: tuple
    help: object  # text, or a function giving it when a parser is built (e.g. from the combiner registry)
    default: object = None  # a value, or a function giving it when a parser is built
    type: object = None
    choices: tuple | None = None
    action: str | None = None
    metavar: str | None = None
    dest: str | None = None
    param: str | None = None

    @property
    def dest_name(self) -> str:
        return self.dest or self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser, default=TABLE_DEFAULT, note: str = "") -> argparse.Action:
        """Add this option to ``parser`` (or an argument group); ``default`` replaces the table's."""
        kwargs = {"dest": self.dest_name, "help": self.help() if callable(self.help) else self.help}
        value = self.default if default is TABLE_DEFAULT else default
        value = value() if callable(value) else value  # e.g. the cache folder, from the environment of now
        if self.action:
            kwargs["action"] = self.action
        if self.action != "store_true":
            kwargs.update(type=self.type, choices=self.choices, metavar=self.metavar)
        if self.action != "store_true":
            kwargs["default"] = [] if self.action == "append" else value
            if value is not None and self.action != "append":
                kwargs["help"] += " (default: %(default)s)"
        kwargs["help"] += note
        return parser.add_argument(*self.flags, **kwargs)




@dataclass(frozen=True)
class Param:
    """One parameter of :class:`stacker.Ensemble`, declared where its concept lives.

    ``doc`` is its numpydoc entry (first line the type, then the text); ``check`` says
    whether a value is valid and ``what`` what a valid value is (for the error);
    ``cli`` is the command-line option that sets it, ``from_cli`` turns that option's
    parsed value into the parameter's (default: as parsed).
    """

    name: str
    default: object
    doc: str
    check: Callable[[object], bool] | None = None
    what: str = ""
    cli: Option | None = None
    from_cli: Callable | None = None

    def validate(self, value) -> None:
        """Raise ``ValueError`` naming the parameter, what it must be and the value received."""
        if self.check is not None and not self.check(value):
            raise ValueError(f"{self.name} must be {self.what}, got {value!r}")

    def value_from(self, args):
        """The parameter's value from parsed command-line ``args`` (its option's default when absent)."""
        value = getattr(args, self.cli.dest_name, None)
        return self.from_cli(value) if self.from_cli else value
