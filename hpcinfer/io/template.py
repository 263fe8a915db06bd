"""input.prompt_template: a Jinja2 template over a row's columns that makes its prompt.

The template is user text that runs once per row, so it runs in jinja2's immutable sandbox
(no attribute tricks into Python internals, no mutation of the row) with StrictUndefined (a
column the row lacks is that row's error, never a silently empty prompt). Both the login side
(`hpcinfer validate`, which renders it over sampled rows) and the reader on the compute side
use this module; jinja2.sandbox is imported only when a job has a template.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


class TemplateError(ValueError):
    """The template does not compile, or does not render for one row."""


@lru_cache(maxsize=8)
def compile_template(source: str):
    """(template, column names it reads) for ``source``; TemplateError on a syntax error."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    # keep_trailing_newline: "...\nAnswer:\n" must end the prompt as written.
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                        keep_trailing_newline=True)
    try:
        template = env.from_string(source)
        columns = tuple(sorted(meta.find_undeclared_variables(env.parse(source))))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"prompt_template is not valid Jinja2 (line {exc.lineno}: "
                            f"{exc.message})") from None
    return template, columns


def template_columns(source: str) -> tuple[str, ...]:
    """The row columns ``source`` reads (for a Parquet projection), sorted."""
    return compile_template(source)[1]


def render_prompt(source: str, row: dict[str, Any]) -> str:
    """The prompt for one row; TemplateError (with the reason) when it cannot be made."""
    import jinja2
    template, _ = compile_template(source)
    try:
        return template.render(**{str(k): v for k, v in row.items()})
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"prompt_template: {exc.message} (columns of this row: "
                            f"{', '.join(map(str, list(row)[:12]))})") from None
    except jinja2.TemplateError as exc:    # incl. SecurityError from the sandbox
        raise TemplateError(f"prompt_template failed on this row ({exc})") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise TemplateError(f"prompt_template failed on this row ({type(exc).__name__}: "
                            f"{exc})") from None
