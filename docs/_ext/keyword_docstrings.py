"""A griffe extension for the docs build: the keyword docs of ``__init__`` methods survive.

``fused_ls._options.takes_keywords`` appends an "Other Parameters:" section to an entry point's
docstring. For the modules' ``__init__``, which have no docstring of their own, the section is
then the docstring's first line, and griffe cleans a docstring twice (``inspect.cleandoc`` when
it reads ``__doc__`` and again in ``Docstring``): the second pass treats the title line as the
summary and strips the items' indentation, so the section is rendered as plain text. This
re-reads such docstrings with a leading blank line, which ``cleandoc`` drops without dedenting.
"""

from __future__ import annotations

import inspect

import griffe


class KeywordDocstrings(griffe.Extension):
    def on_function_instance(self, *, node, func, agent, **kwargs) -> None:
        obj = getattr(node, "obj", None)
        doc = func.docstring
        if doc is None or not hasattr(obj, "__fused_ls_keywords__"):
            return
        func.docstring = griffe.Docstring(
            "\n" + inspect.cleandoc(obj.__doc__),
            lineno=doc.lineno,
            endlineno=doc.endlineno,
            parent=func,
            parser=doc.parser,
            parser_options=doc.parser_options,
        )
