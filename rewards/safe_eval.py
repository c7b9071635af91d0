"""A safe arithmetic evaluator for answers written by a policy or sent by a client.

Python's ``eval`` and sympy's ``sympify`` / ``parse_expr`` run arbitrary code and have no bound on work
(``9**9**9`` holds the interpreter for hours), so no scorer in flowrl hands them untrusted text. This module
reads the text with :func:`ast.parse` (which only builds a tree, it runs nothing) and walks the tree itself,
accepting only this grammar::

    expr   := number | expr op expr | ("+" | "-") expr | "(" expr ")"
    op     := "+" | "-" | "*" | "/" | "**"
    number := digits ["." digits] [("e" | "E") ["+" | "-"] digits]        (no 0x / 0b / 1_000 / 1j)

Values are exact :class:`fractions.Fraction` (``/`` is exact division, ``0.1`` is 1/10). Everything else
(names, calls, attributes, comparisons, subscripts, strings, ...) is rejected, and so is any input over one of
the :class:`Limits`, checked *before* the work it bounds is done:

- ``max_length`` characters of input (checked before parsing);
- ``max_depth`` nesting depth of the tree;
- ``max_exponent``: ``|e|`` of a power ``b ** e`` (``e`` must be an integer);
- ``max_digits``: decimal digits of the numerator and the denominator of every literal and every
  intermediate value (a power is refused from the sizes of its operands, before it is computed).

So the work of one evaluation is at most O(length * max_digits^2) digit operations: microseconds.
A rejection raises :class:`UnsafeExpression` whose ``reason`` is one of :data:`REASONS`.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from .ast_lock import AST_LOCK

REASONS = ("length", "syntax", "node", "depth", "exponent", "digits", "zero_division")
# log10(2): digits of an integer from its bit length without converting it to a string
_LOG10_2 = math.log10(2)
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?")


class UnsafeExpression(ValueError):
    """The text is not an arithmetic expression of the safe grammar, or it exceeds a limit.

    ``reason``: one of :data:`REASONS` (``"length"``, ``"syntax"``, ``"node"``, ``"depth"``, ``"exponent"``,
    ``"digits"``, ``"zero_division"``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds on one evaluation (see the module docstring). Every field must be a positive integer."""

    max_length: int = 512
    max_depth: int = 40
    max_exponent: int = 100
    max_digits: int = 100

    def __post_init__(self):
        for k in ("max_length", "max_depth", "max_exponent", "max_digits"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"safe_eval Limits.{k} must be a positive integer; got {v!r}")


DEFAULT_LIMITS = Limits()


def _digits(n: int) -> int:
    """An upper bound on the decimal digits of ``|n|`` (exact to within one), from its bit length."""
    return int(abs(n).bit_length() * _LOG10_2) + 1


def _check_size(v: Fraction, lim: Limits, what: str) -> Fraction:
    if _digits(v.numerator) > lim.max_digits or _digits(v.denominator) > lim.max_digits:
        raise UnsafeExpression("digits", f"{what} has more than {lim.max_digits} digits")
    return v


def _source_lines(text: str) -> list[bytes]:
    """The UTF-8 bytes of each line as the parser counts lines (``\\r\\n``, ``\\r`` and ``\\n`` end one),
    split once: ``ast.get_source_segment`` splits the whole text again for every literal (quadratic)."""
    return [line.encode("utf-8") for line in re.split(r"\r\n|\r|\n", text)]


def _segment(lines: list[bytes], node: ast.AST) -> Optional[str]:
    """The source text of a one-line node (its column offsets count UTF-8 bytes)."""
    if node.lineno != node.end_lineno:
        return None
    return lines[node.lineno - 1][node.col_offset : node.end_col_offset].decode("utf-8", "replace")


def _literal(lines: list[bytes], node: ast.Constant, lim: Limits) -> Fraction:
    seg = _segment(lines, node)
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)) or seg is None:
        raise UnsafeExpression("node", f"literal {seg if seg is not None else node.value!r:.40} is not a number")
    m = _NUMBER.fullmatch(seg)
    if m is None:  # 0x1f, 0b1, 1_000, 1j (complex is not int/float anyway)
        raise UnsafeExpression("node", f"number {seg!r:.40} is not written in decimal digits")
    mantissa = seg[: m.start(1) - 1] if m.group(1) is not None else seg
    if len(mantissa.replace(".", "")) > lim.max_digits:
        raise UnsafeExpression("digits", f"number {seg[:40]!r} has more than {lim.max_digits} digits")
    if m.group(1) is not None and (len(m.group(1)) > 6 or abs(int(m.group(1))) > lim.max_digits):
        raise UnsafeExpression("digits", f"number {seg[:40]!r}: exponent over {lim.max_digits}")
    return _check_size(Fraction(seg), lim, f"number {seg[:40]!r}")


def _power(base: Fraction, exp: Fraction, lim: Limits) -> Fraction:
    if exp.denominator != 1:
        raise UnsafeExpression("exponent", f"exponent {exp} is not an integer")
    e = exp.numerator
    if abs(e) > lim.max_exponent:
        raise UnsafeExpression("exponent", f"|exponent| {abs(e)} > {lim.max_exponent}")
    if base == 0 and e < 0:
        raise UnsafeExpression("zero_division", "0 raised to a negative power")
    # the result's digits are about |e| times the base's: refuse before computing
    big = max(_digits(base.numerator), _digits(base.denominator))
    if base not in (0, 1, -1) and (big - 1) * abs(e) > lim.max_digits:
        raise UnsafeExpression("digits", f"a power with {big}-digit base and exponent {e} exceeds {lim.max_digits} digits")
    return _check_size(base ** e, lim, "a power")


def _walk(lines: list[bytes], node: ast.AST, lim: Limits, depth: int) -> Fraction:
    if depth > lim.max_depth:
        raise UnsafeExpression("depth", f"nesting deeper than {lim.max_depth}")
    if isinstance(node, ast.Constant):
        return _literal(lines, node, lim)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _walk(lines, node.operand, lim, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        a = _walk(lines, node.left, lim, depth + 1)
        b = _walk(lines, node.right, lim, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _power(a, b, lim)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise UnsafeExpression("zero_division", "division by zero")
            return _check_size(a / b, lim, "a quotient")
        out = a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        return _check_size(out, lim, "an intermediate value")
    raise UnsafeExpression("node", f"{type(node).__name__} is not part of the arithmetic grammar")


def safe_eval(text: str, limits: Optional[Limits] = None) -> Fraction:
    """The exact value of the arithmetic expression ``text`` (grammar and limits: module docstring).

    Raises :class:`UnsafeExpression` (with ``reason``) for anything else; never runs code."""
    lim = limits or DEFAULT_LIMITS
    if not isinstance(text, str):
        raise UnsafeExpression("syntax", f"expected a string, got {type(text).__name__}")
    if len(text) > lim.max_length:
        raise UnsafeExpression("length", f"{len(text)} characters > {lim.max_length}")
    text = text.strip()
    try:
        with AST_LOCK:  # ast.parse from two threads at once is not safe on CPython < 3.11.8 (see ast_lock)
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise UnsafeExpression("syntax", f"not an expression ({type(e).__name__})") from None
    return _walk(_source_lines(text), tree.body, lim, 1)


def try_safe_eval(text: str, limits: Optional[Limits] = None) -> tuple[Optional[Fraction], Optional[str]]:
    """(value, None) or (None, reason): :func:`safe_eval` without the exception."""
    try:
        return safe_eval(text, limits), None
    except UnsafeExpression as e:
        return None, e.reason
