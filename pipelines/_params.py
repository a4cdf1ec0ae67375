"""Reading one section of params.yaml and layering command-line overrides on it."""

from __future__ import annotations

import argparse
import json
import os

import yaml


def load_section(path: str, section: str, required: bool) -> dict:
    """Section ``section`` of the YAML file ``path`` ({} when absent).

    A missing file is an error only when ``required`` (the user named it explicitly), so
    the CLI also works outside the repository with its built-in defaults.
    """
    if not os.path.exists(path):
        if required:
            raise SystemExit(f"error: params file {path} does not exist")
        return {}
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise SystemExit(f"error: {path} must hold a mapping of sections")
    return params.get(section) or {}


def overrides(args: argparse.Namespace, fields: set[str]) -> dict:
    """The options given on the command line (argparse default None means 'not given')."""
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def apply_overrides(
    section: dict, args: argparse.Namespace, options: dict[str, tuple[str | None, str]]
) -> dict:
    """A copy of a params ``section`` with the command-line options given in ``args``:
    ``options`` maps an argparse dest to (sub-section or None, key)."""
    section = {k: (dict(v) if isinstance(v, dict) else v) for k, v in section.items()}
    for name, (sub, key) in options.items():
        value = getattr(args, name)
        if value is None:
            continue
        if sub is None:
            section[key] = value
        else:
            section.setdefault(sub, {})[key] = value
    return section


def nullable(text: str) -> str | None:
    """argparse type for options whose params value may be null: 'none' / 'null' -> None."""
    return None if text.lower() in ("none", "null", "") else text


def nullable_int(text: str) -> int | None:
    return None if nullable(text) is None else int(text)


def json_mapping(text: str) -> dict:
    """argparse type for a JSON object such as storage options."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def stage_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of stage CLI ``python -m <module>``: its docstring's first paragraph as
    description, plus ``--params`` and ``--dry-run``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n\n")[0],
        epilog="Values in [brackets] are the built-in defaults that params.yaml overrides.",
    )
    params_argument(parser)
    return parser


def params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=None,
        metavar="FILE",
        help="YAML file whose section for this stage gives the settings; options given on "
        "the command line override it (default: params.yaml, if present)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved settings as JSON and exit without reading or writing data",
    )
