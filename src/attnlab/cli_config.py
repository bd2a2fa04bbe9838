"""Command-line options generated from a config dataclass: one source of defaults and help.

Each field of the dataclass becomes ``--field-name``; its type gives the option's type, its trailing
comment (``seq_len: int = 128  # tokens per window``) the help text, and its default the ``[default: ...]``
note. The fields are read from the module's source with :mod:`ast`, so building the CLI never imports
the (torch-heavy) module that defines the dataclass and ``--help`` stays instant. Options default to
None, meaning "not given": the dataclass fills in its own default, and a ``--config`` TOML table (click's
default_map) or a flag overrides it. Validation stays in the dataclass (``__post_init__`` / ``validate``),
so the CLI, the TOML file and the Python API check values in one place.
"""

from __future__ import annotations

import ast
import re
import dataclasses
import importlib.util
import inspect
import io
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, List, Optional, Sequence

import typer

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class ConfigField:
    """One dataclass field as the CLI sees it."""

    name: str
    kind: str  # int | float | str | bool | list (comma/space separated values) | ints (e.g. '0,2-4') | words
    optional: bool  # None is a valid value
    default: str  # the default as written in the source ("required" for none)
    help: str  # the field's trailing comment
    value: Any = None  # the default evaluated from the source (:data:`UNKNOWN` when it is not a plain value)
    alias: str = ""  # the flag when it is not ``--field-name`` (config_command's ``flags``)

    @property
    def flag(self) -> str:
        """``--field-name`` (or the alias)."""
        return self.alias or "--" + self.name.replace("_", "-")


def _kind(annotation: str) -> tuple[str, bool]:
    a = annotation.replace(" ", "")
    optional = a.startswith("Optional[") or a.endswith("|None") or a.startswith("None|")
    for wrap in ("Optional[",):
        if a.startswith(wrap):
            a = a[len(wrap):-1]
    a = a.replace("|None", "").replace("None|", "")
    if a in _SCALARS:
        return a, optional
    if a in ("list[int]",):
        return "ints", optional
    if a.startswith("list") or a.startswith("tuple") or a.startswith("Sequence"):
        return "list", optional
    if a in ("float|int", "int|float"):
        return "float", optional
    return "str", optional


def _default_text(node: Optional[ast.expr]) -> str:
    if node is None:
        return "required"
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value)
            if kw.arg == "default_factory":
                v = kw.value
                return ast.unparse(v.body) if isinstance(v, ast.Lambda) else f"{ast.unparse(v)}()"
    return ast.unparse(node)


UNKNOWN = object()  # a default that is not a literal (shown as written; the help test flags it)
REQUIRED = object()  # a field without a default
_CALLS = {"list": list, "tuple": tuple, "sorted": sorted, "float": float, "int": int, "str": str}


def _value(node: Optional[ast.expr], consts: dict[str, ast.expr], depth: int = 0) -> Any:
    """The value of a default expression: literals, arithmetic on numbers (``1 / 32``), module constants and
    ``list(...)`` / ``tuple(...)`` of those; :data:`UNKNOWN` for anything else (the module is never imported)."""
    import operator

    if node is None:
        return REQUIRED
    if depth > 8:
        return UNKNOWN
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _value(kw.value, consts, depth + 1)
            if kw.arg == "default_factory":
                v = kw.value
                if isinstance(v, ast.Lambda):
                    return _value(v.body, consts, depth + 1)
                return _CALLS[v.id]() if isinstance(v, ast.Name) and v.id in _CALLS else UNKNOWN
        return REQUIRED
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.USub: operator.neg}
    try:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [_value(e, consts, depth + 1) for e in node.elts]
            if any(i is UNKNOWN for i in items):
                return UNKNOWN
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = _value(node.left, consts, depth + 1), _value(node.right, consts, depth + 1)
            return UNKNOWN if UNKNOWN in (a, b) else ops[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            a = _value(node.operand, consts, depth + 1)
            return UNKNOWN if a is UNKNOWN else ops[type(node.op)](a)
        if isinstance(node, ast.Name) and node.id in consts:
            return _value(consts[node.id], consts, depth + 1)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in _CALLS and len(node.args) == 1:
            a = _value(node.args[0], consts, depth + 1)
            return UNKNOWN if a is UNKNOWN else _CALLS[node.func.id](a)
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    return UNKNOWN


def _constants(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = expr`` assignments (the constants a default may name)."""
    out: dict[str, ast.expr] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            out[stmt.target.id] = stmt.value
    return out


def show_value(v: Any, flag: str = "") -> str:
    """A default as a person writes it on the command line: 0.25, minilm, 0.0625, 0.125, on/off flags by name."""
    if isinstance(v, bool):
        return flag.lstrip("-") if v else "no-" + flag.lstrip("-")
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(show_value(x) for x in v) if v else "none"
    return str(v)


def _comments(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


@lru_cache(maxsize=None)
def config_fields(target: str) -> tuple[ConfigField, ...]:
    """The fields of dataclass ``'package.module:Class'`` (or the keyword parameters of a function), read from
    the module source (not imported)."""
    module, cls = target.split(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {module}")
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    comments = _comments(source)
    tree = ast.parse(source)
    consts = _constants(tree)
    node = next((n for n in ast.walk(tree)
                 if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == cls), None)
    if node is None:
        raise ImportError(f"{module} has no class or function {cls}")
    fields = []
    if isinstance(node, ast.FunctionDef):  # a function's keyword parameters (help via help_extra)
        args = node.args.args + node.args.kwonlyargs
        defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
        for a, d in zip(args, defaults):
            if a.annotation is None:
                continue
            kind, optional = _kind(ast.unparse(a.annotation))
            fields.append(ConfigField(a.arg, kind, optional, _default_text(d), comments.get(a.lineno, ""),
                                      _value(d, consts)))
        return tuple(fields)
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        kind, optional = _kind(ast.unparse(stmt.annotation))
        fields.append(ConfigField(stmt.target.id, kind, optional, _default_text(stmt.value),
                                  comments.get(stmt.lineno, "").rstrip("."), _value(stmt.value, consts)))
    return tuple(fields)


def parse_value(f: ConfigField, value: Any) -> Any:
    """A CLI / TOML value of field ``f`` in the field's type (lists from 'a,b c' strings or TOML lists)."""
    if value is None or f.kind not in ("list", "ints", "number"):
        return value
    if f.kind == "number":
        v = _number(value)
        if isinstance(v, str):
            from .errors import ConfigError

            raise ConfigError(f"{f.flag} {value!r} is not a number (a fraction like 0.25 or a count like 32)")
        return v
    from .cli_utils import parse_int_list, split_words

    items = split_words([str(x) for x in value] if isinstance(value, (list, tuple)) else [value]) or []
    from .validate import check_list

    if f.kind == "ints":
        return check_list(f.name, parse_int_list(",".join(items), f.flag), f.flag)
    return check_list(f.name, [_number(x) for x in items], f.flag)


def _number(x: Any) -> Any:
    """'0.25' -> 0.25, '32' -> 32, other words unchanged (budgets are fractions or counts)."""
    if not isinstance(x, str):
        return x
    for conv in (int, float):
        try:
            return conv(x)
        except ValueError:
            pass
    return x


def _none_means(text: str) -> tuple[str, Optional[str]]:
    """Split "Basis size (None: min(k90, budget))" into ("Basis size", "min(k90, budget)"); (text, None) if absent."""
    m = re.search(r"\(None\s*[:=]\s*", text)
    if not m:
        m = re.match(r"None\s*[:=]\s*", text)
        return ("", text[m.end():].strip()) if m else (text, None)
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    meaning = text[m.end():i - 1 if depth == 0 else i].strip()
    return (text[:m.start()] + text[i:]).strip().rstrip(".,;"), meaning
_RST = re.compile(r"``([^`]+)``|:[a-z]+:`~?([^`]+)`")


def _sentence(text: str) -> str:
    """A comment as a help sentence: first letter upper-cased unless it starts with a value name ('mlm | clm',
    'k of ...'); RST markup gone (``x`` -> x)."""
    text = _RST.sub(lambda m: m.group(1) or m.group(2).rsplit(".", 1)[-1], text).strip().rstrip(".")
    first = text.split(" ", 1)
    literal = len(first[0]) == 1 or (len(first) > 1 and first[1][:1] in "|(")
    return text if literal or not text else text[:1].upper() + text[1:]


def help_text(f: ConfigField, help_extra: dict[str, str], shown: Optional[dict[str, str]] = None) -> str:
    """The help line of field ``f``: a sentence and its default as a value (``[default: 0.25]``), never source text.
    A None default is explained by the help's own "(None: ...)" phrase, which becomes the default note."""
    text = _sentence(help_extra.get(f.name) or f.help or SHARED_HELP.get(f.name, ""))
    if (shown or {}).get(f.name):
        return f"{text}. [default: {shown[f.name]}]"
    if f.value is REQUIRED:
        return f"{text}."  # click adds [required]
    if f.value is None:
        text, meaning = _none_means(text)
        return f"{text}. [default: {meaning}]" if meaning else f"{text}."
    value = f.default if f.value is UNKNOWN else show_value(f.value, f.flag)
    return f"{text}. [default: {value}]"  # plain help (the app sets rich_markup_mode=None): shown as is


def _option(f: ConfigField, help_extra: dict[str, str], shown: Optional[dict[str, str]] = None) -> tuple[Any, Any]:
    text = help_text(f, help_extra, shown)
    if f.kind == "bool":
        return Optional[bool], typer.Option(None, f"{f.flag}/--no-{f.flag[2:]}", help=text, show_default=False)
    if f.kind in ("list", "words"):  # repeat the flag or give a comma/space separated list
        return Optional[List[str]], typer.Option(None, f.flag, help=text, show_default=False)
    typ = {"int": int, "float": float}.get(f.kind, str)
    if f.value is REQUIRED:  # a field without a default must be given
        return typ, typer.Option(..., f.flag, help=text, show_default=False)
    return Optional[typ], typer.Option(None, f.flag, help=text, show_default=False)


def config_command(app: typer.Typer, name: str, target: str | Sequence[str], run: Callable[..., None], *,
                   skip: Sequence[str] = (), extra: Sequence[inspect.Parameter] = (),
                   help_extra: Optional[dict[str, str]] = None, kinds: Optional[dict[str, str]] = None,
                   doc: Optional[str] = None, shown: Optional[dict[str, str]] = None,
                   flags: Optional[dict[str, str]] = None,
                   context_settings: Optional[dict[str, Any]] = None,
                   late_help: Optional[dict[str, Callable[[], str]]] = None) -> Callable[..., None]:
    """Register command ``name`` on ``app`` with one option per field of ``target`` (minus ``skip``) plus the
    ``extra`` parameters; ``run(settings, **extra_values)`` gets the given fields, parsed to their types.
    Several targets (e.g. a training config and the run function): ``settings`` is a dict per target, and a
    name both have belongs to the first. ``kinds`` overrides a field's parsed kind: 'ints' ('0,2-4'), 'list'
    (words/numbers), 'number' (int or float), 'words' (the strings as given, parsed by ``run``). ``help_extra``
    gives a field's help where its comment is missing or too terse; ``shown`` a default note where the default
    depends on another option (e.g. ``lm train --preset``). ``flags`` names a field's flag where it is not
    --field-name (e.g. --norm-T); ``context_settings`` go to click (e.g. allow_extra_args). ``late_help`` gives a
    field a function whose text is appended to its help when --help is shown (e.g. names read from a registry that
    imports torch: nothing is imported until then)."""
    targets = [target] if isinstance(target, str) else list(target)
    owner = {f.name: t for t in reversed(targets) for f in config_fields(t)}  # a shared name goes to the first
    fields = [dataclasses.replace(f, kind=(kinds or {}).get(f.name, f.kind), alias=(flags or {}).get(f.name, ""))
              for t in targets for f in config_fields(t) if f.name not in skip and owner[f.name] == t]
    params, annotations = [], {}
    for f in fields:
        typ, opt = _option(f, help_extra or {}, shown)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ))
        annotations[f.name] = typ
    for p in extra:
        params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        annotations[p.name] = p.annotation
    by_name = {f.name: f for f in fields}

    def command(**values: Any) -> None:
        given = {k: v for k, v in values.items() if k in by_name and v is not None and v != [] and v != ()}
        settings = {k: parse_value(by_name[k], v) for k, v in given.items()}
        if len(targets) > 1:  # one settings dict per target
            settings = {t: {k: v for k, v in settings.items() if owner[k] == t} for t in targets}
        run(settings, **{k: v for k, v in values.items() if k not in by_name})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = doc or run.__doc__
    command.__name__ = name.replace("-", "_")
    command._attnlab_late_help = {k: (fn, by_name[k], help_extra or {}, shown) for k, fn in (late_help or {}).items()}
    for mark in ("_attnlab_out_files", "_attnlab_out_inside", "_attnlab_resume_interrupted"):  # see cli_utils.out_files / harden
        if hasattr(run, mark):
            setattr(command, mark, getattr(run, mark))
    from .cli_utils import HardenedCommand

    return app.command(name, cls=HardenedCommand, context_settings=context_settings)(command)


def fill_late_help(cmd: Any) -> None:
    """Complete the help of ``cmd``'s options that have a ``late_help`` function (see :func:`config_command`)."""
    late = getattr(cmd.callback, "_attnlab_late_help", None) or {}
    for p in cmd.params:
        if p.name in late:
            fn, f, extra, shown = late[p.name]
            p.help = help_text(f, {f.name: f"{_sentence(extra.get(f.name) or f.help)}: {fn()}"}, shown)


def option(name: str, annotation: Any, default: Any, *decls: str, **kw: Any) -> inspect.Parameter:
    """An extra (non-config) parameter for :func:`config_command`, e.g. the shared --out / --resume / --quiet."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, *decls, **kw),
                             annotation=annotation)


def out_option(default: Optional[str], what: str = "Run directory") -> inspect.Parameter:
    """``--out``: the run directory every command writes (results.json, tensors, plots)."""
    return option("out", str, default, "--out", help=f"{what}.")


def resume_option() -> inspect.Parameter:
    """``--resume``: continue an interrupted run from its checkpoint / reuse finished parts (same settings only)."""
    return option("resume", bool, False, "--resume/--no-resume",
                  help="Continue an interrupted run from its checkpoint (settings must match).")


QUIET_HELP = "No progress lines or info messages; results, warnings and errors still print."
SEED_HELP = "Random seed (same seed, same numbers)"
# Fallback help of fields every config has (a field's own comment or the command's help_extra wins).
SHARED_HELP = {"seed": SEED_HELP, "device": "Where the model runs: cpu, cuda or cuda:N"}


def quiet_option() -> inspect.Parameter:
    """``--quiet``: no progress lines or info messages (the same flag and meaning in every command)."""
    return option("quiet", bool, False, "--quiet", help=QUIET_HELP)
