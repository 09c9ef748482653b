"""A small safe evaluator for ComfyMathExpression: an ast walk over a whitelist of operators and functions,
bounded in size and exponent; never ``eval``.
"""

from __future__ import annotations

import ast
import math

_MAX_EXPRESSION_CHARS = 1000
_MAX_EXPONENT = 1000
_MATH_FUNCTIONS = {
    "min": min, "max": max, "abs": abs, "round": round, "sqrt": math.sqrt, "ceil": math.ceil, "floor": math.floor,
    "log": math.log, "log2": math.log2, "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "int": int, "float": float, "pow": None, "sum": None,  # pow/sum: bounded versions below
}



class _ExprError(Exception):
    pass


def _bounded_pow(base, exp):
    if abs(exp) > _MAX_EXPONENT:
        raise _ExprError(f"exponent {exp} is larger than {_MAX_EXPONENT}")
    return pow(base, exp)


def _sum(*args):
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return sum(args)


_FUNCS = {**{k: v for k, v in _MATH_FUNCTIONS.items() if v is not None}, "pow": _bounded_pow, "sum": _sum}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: _bounded_pow}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}


def _safe_eval(expression: str, names: dict):
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise _ExprError(f"longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _ExprError(f"not a valid expression ({type(exc).__name__})") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return node.value
            raise _ExprError(f"constant {node.value!r:.40} is not a number")
        if isinstance(node, ast.Name):
            if node.id in names:
                v = names[node.id]
                return int(v) if isinstance(v, bool) else v
            raise _ExprError(f"name {node.id!r} is not a connected input")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords and len(node.args) <= 16:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise _ExprError(f"{type(node).__name__} is not allowed")

    try:
        result = ev(tree)
    except _ExprError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise _ExprError(f"{type(exc).__name__}: {exc}") from None
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        raise _ExprError(f"result {result!r:.40} is not a number")
    if isinstance(result, float) and not math.isfinite(result):
        raise _ExprError(f"result {result} is not finite")
    return result
