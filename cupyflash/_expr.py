"""User mask and bias expressions (``mask_mod``, ``bias_mod``): a small subset of C++ expression
syntax that means the same in CUDA C++ (compiled into the kernels) and here, where the NumPy
backend and the tests evaluate it on index arrays with C++'s rules.

The subset:

- names: ``b``, ``h`` (the query head), ``q_idx``, ``kv_idx`` (positions within the sequence,
  ints), ``true``, ``false``, and the call's ``aux`` arrays, indexed as ``doc[q_idx]`` or
  ``table[h][kv_idx - q_idx + 64]`` (one ``[...]`` per axis);
- literals: ints (``64``) and floats (``0.5``, ``1e-3``, ``2.0f``);
- operators, with C++'s precedence and associativity: unary ``- + !``; ``* / %``; ``+ -``;
  ``< <= > >=``; ``== !=``; ``&&``; ``||``; ``c ? a : b``; parentheses;
- functions: ``min max abs`` (int or float), ``exp log log2 sqrt tanh floor ceil`` (float).

C++'s rules, kept here: int ``/`` truncates toward zero and ``%`` takes the sign of the dividend;
an int and a float make a float; comparisons, ``&&``, ``||``, ``!`` give bools (any nonzero
value is true). Ints are evaluated as 64-bit here: keep values within 32 bits (the kernels' int).
Not in the subset (a ValueError names them): assignments, bitwise operators, casts, pointers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
FUNCTIONS = {"min": 2, "max": 2, "abs": 1, "exp": 1, "log": 1, "log2": 1, "sqrt": 1, "tanh": 1, "floor": 1, "ceil": 1}
_FLOAT_FUNCTIONS = ("exp", "log", "log2", "sqrt", "tanh", "floor", "ceil")

_TOKEN = re.compile(r"""\s*(?:
    (?P<float>(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?[fF]?)
  | (?P<int>\d+)(?![\w.])
  | (?P<name>[A-Za-z_]\w*)
  | (?P<op>&&|\|\||==|!=|<=|>=|[-+*/%<>!?:()\[\],])
  )""", re.VERBOSE)

# binary operators: precedence (higher binds tighter), all left-associative
_BINARY = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}


class ExprError(ValueError):
    """A user expression that does not parse or evaluate, shown with a caret under the place."""

    def __init__(self, what: str, text: str, pos: int, message: str):
        super().__init__(f"{what}: {message}\n    {text}\n    {' ' * pos}^")


@dataclass(frozen=True)
class Expr:
    """A parsed expression: its text, its tree and the aux names it reads."""
    what: str   # "mask_mod" or "bias_mod" (error messages)
    text: str
    tree: tuple
    names: frozenset

    def evaluate(self, env: dict):
        """The value on broadcast index arrays ``env`` (name -> array, aux names -> arrays):
        (numpy array, kind) with kind "int", "float" or "bool"."""
        return _Evaluator(self, env).eval(self.tree)


def parse(what: str, text) -> Expr:
    """Parse ``text`` (a mask_mod or bias_mod string); ValueError with a caret where it fails."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string (a C++ expression of b, h, q_idx, kv_idx and aux arrays), "
                        f"got {type(text).__name__}")
    tokens = _tokenize(what, text)
    parser = _Parser(what, text, tokens)
    tree = parser.expression(0)
    if parser.peek()[0] != "end":
        raise ExprError(what, text, parser.peek()[2], f"unexpected {parser.peek()[1]!r}")
    names = frozenset(_names(tree))
    return Expr(what, text, tree, names)


def _tokenize(what: str, text: str) -> list:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            bad = text[start]
            hint = {"&": " (bitwise operators are not in the subset: && is)", "|": " (bitwise operators are not in "
                    "the subset: || is)", "^": " (bitwise operators are not in the subset)", "~": " (bitwise "
                    "operators are not in the subset)", "=": " (assignments are not in the subset: == compares)"}
            raise ExprError(what, text, start, f"unexpected character {bad!r}{hint.get(bad, '')}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(("end", "end of the expression", len(text)))
    return tokens


class _Parser:
    """Precedence climbing over the token list."""

    def __init__(self, what, text, tokens):
        self.what, self.text, self.tokens, self.i = what, text, tokens, 0

    def peek(self):
        return self.tokens[self.i]

    def take(self, value=None):
        tok = self.tokens[self.i]
        if value is not None and tok[1] != value:
            raise ExprError(self.what, self.text, tok[2], f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def expression(self, min_prec: int):
        left = self.unary()
        while True:
            kind, op, pos = self.peek()
            if kind == "op" and op == "?" and min_prec == 0:
                self.take()
                a = self.expression(0)
                self.take(":")
                b = self.expression(0)  # right-associative
                left = ("?", pos, left, a, b)
                continue
            prec = _BINARY.get(op) if kind == "op" else None
            if prec is None or prec < min_prec:
                return left
            self.take()
            right = self.expression(prec + 1)
            left = ("bin", pos, op, left, right)

    def unary(self):
        kind, op, pos = self.peek()
        if kind == "op" and op in "-+!":
            self.take()
            return ("un", pos, op, self.unary())
        return self.postfix(self.primary())

    def primary(self):
        kind, value, pos = self.take()
        if kind == "int":
            return ("int", pos, int(value))
        if kind == "float":
            return ("float", pos, float(value.rstrip("fF")))
        if kind == "name":
            if value in ("true", "false"):
                return ("bool", pos, value == "true")
            if self.peek()[1] == "(":
                if value not in FUNCTIONS:
                    raise ExprError(self.what, self.text, pos, f"unknown function {value!r}; the subset has "
                                    f"{', '.join(FUNCTIONS)}")
                self.take("(")
                args = [self.expression(0)]
                while self.peek()[1] == ",":
                    self.take()
                    args.append(self.expression(0))
                self.take(")")
                if len(args) != FUNCTIONS[value]:
                    raise ExprError(self.what, self.text, pos, f"{value} takes {FUNCTIONS[value]} argument(s), "
                                    f"got {len(args)}")
                return ("call", pos, value, tuple(args))
            return ("name", pos, value)
        if value == "(":
            inner = self.expression(0)
            self.take(")")
            return inner
        raise ExprError(self.what, self.text, pos, f"unexpected {value!r}")

    def postfix(self, node):
        while self.peek()[1] == "[":
            pos = self.take()[2]
            index = self.expression(0)
            self.take("]")
            node = ("index", pos, node, index)
        return node


def _names(node):
    """The names a tree reads (nodes are (tag, position, ...) tuples; a call's arguments a tuple of nodes)."""
    if node[0] == "name":
        yield node[2]
        return
    for child in _children(node):
        yield from _names(child)


def _children(node):
    """The subtrees of a node."""
    for child in node[2:]:
        if isinstance(child, tuple):
            yield from ((child,) if isinstance(child[0], str) else child)


def element_reads(expr: Expr) -> int:
    """How many aux reads of the expression index by both q_idx and kv_idx: a different address for
    almost every score of a tile (``table[kv_idx - q_idx]``, a dense tensor), where ``doc[q_idx]``
    is one read per row and ``doc[kv_idx]`` one per column. The Hopper forward evaluates a tile's
    terms ahead of its scores only where such reads are few (UserTerms::ELEMENT_READS)."""
    def count(node) -> int:
        if node[0] != "index":
            return sum(count(c) for c in _children(node))
        names, reads = set(), 0
        while node[0] == "index":  # one read: an array and all its indices
            names |= set(_names(node[3]))
            reads += count(node[3])
            node = node[2]
        return reads + int({"q_idx", "kv_idx"} <= names)
    return count(expr.tree)


class _Partial:
    """An aux array indexed along its first axes so far (``table[h]`` before ``[kv_idx]``)."""

    def __init__(self, name, array, indices):
        self.name, self.array, self.indices = name, array, indices


def _start(node) -> int:
    """Where a subtree's text starts: its leftmost node's position."""
    if node[0] in ("bin", "index"):
        return _start(node[3] if node[0] == "bin" else node[2])
    if node[0] == "?":
        return _start(node[2])
    return node[1]


def _trunc_div(a, b):
    """C++'s integer division: the quotient truncated toward zero."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def array_kind(x) -> str:
    """The kind ("int", "float", "bool") an array's values have in an expression."""
    return "bool" if x.dtype == np.bool_ else "float" if x.dtype.kind == "f" else "int"


class _Evaluator:
    def __init__(self, expr: Expr, env: dict):
        self.expr, self.env = expr, env

    def fail(self, pos, message):
        raise ExprError(self.expr.what, self.expr.text, pos, message)

    def eval(self, node):
        value = self.value(node)
        if isinstance(value, _Partial):
            self.fail(_start(node), f"aux array {value.name!r} has {value.array.ndim} axes: index every one")
        return value

    def value(self, node):
        tag, pos = node[0], node[1]
        if tag == "int":
            return np.int64(node[2]), "int"
        if tag == "float":
            return np.float64(node[2]), "float"
        if tag == "bool":
            return np.bool_(node[2]), "bool"
        if tag == "name":
            if node[2] not in self.env:
                known = ", ".join(INDEX_NAMES + tuple(n for n in self.env if n not in INDEX_NAMES))
                self.fail(pos, f"unknown name {node[2]!r}; known: {known}")
            x = self.env[node[2]]
            if node[2] in INDEX_NAMES:
                return x, "int"
            return _Partial(node[2], x, ())
        if tag == "index":
            return self.index(node)
        if tag == "un":
            x, kind = self.eval(node[3])
            if node[2] == "!":
                return np.logical_not(x != 0) if kind != "bool" else np.logical_not(x), "bool"
            if kind == "bool":
                x, kind = x.astype(np.int64), "int"
            return (-x if node[2] == "-" else +x), kind
        if tag == "bin":
            return self.binary(node)
        if tag == "?":
            c, _ = self.eval(node[2])
            a, ka = self.eval(node[3])
            b, kb = self.eval(node[4])
            kind = "float" if "float" in (ka, kb) else "int" if "int" in (ka, kb) else "bool"
            return np.where(c != 0, a, b), kind
        if tag == "call":
            return self.call(node)
        raise AssertionError(node)

    def index(self, node):
        base = self.value(node[2])
        if not isinstance(base, _Partial):
            self.fail(node[1], "only aux arrays can be indexed")
        i, kind = self.eval(node[3])
        if kind != "int":
            self.fail(_start(node[3]), f"an index of {base.name!r} must be an int, got a {kind}")
        axis = len(base.indices)
        if axis >= base.array.ndim:
            self.fail(node[1], f"aux array {base.name!r} has {base.array.ndim} axes, indexed with more")
        size = base.array.shape[axis]
        i = np.asarray(i)
        if i.size and (i.min() < 0 or i.max() >= size):
            bad = int(i.min()) if i.min() < 0 else int(i.max())
            self.fail(_start(node[3]), f"index {bad} out of bounds for axis {axis} of aux array {base.name!r} "
                      f"(size {size})")
        indices = base.indices + (i,)
        if len(indices) < base.array.ndim:
            return _Partial(base.name, base.array, indices)
        x = base.array[indices]
        return x, array_kind(base.array)

    def binary(self, node):
        op = node[2]
        a, ka = self.eval(node[3])
        b, kb = self.eval(node[4])
        if op in ("&&", "||"):
            a, b = (a != 0) if ka != "bool" else a, (b != 0) if kb != "bool" else b
            return (np.logical_and(a, b) if op == "&&" else np.logical_or(a, b)), "bool"
        if op in ("==", "!=", "<", "<=", ">", ">="):
            return {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
                    ">=": np.greater_equal}[op](a, b), "bool"
        # arithmetic: bools promote to int, int with float to float (C++'s usual conversions)
        a = a.astype(np.int64) if ka == "bool" else a
        b = b.astype(np.int64) if kb == "bool" else b
        kind = "float" if "float" in (ka, kb) else "int"
        if kind == "float":
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if op == "+":
            return a + b, kind
        if op == "-":
            return a - b, kind
        if op == "*":
            return a * b, kind
        if kind == "int" and np.any(np.asarray(b) == 0):
            self.fail(node[1], f"integer {op} by zero")
        if op == "/":
            return (a / b if kind == "float" else _trunc_div(a, b)), kind
        if kind == "float":  # % of floats is not C++ (fmod is not in the subset either)
            self.fail(node[1], "% takes ints")
        return a - b * _trunc_div(a, b), kind  # C++: the remainder has the dividend's sign

    def call(self, node):
        name, args = node[2], [self.eval(a) for a in node[3]]
        kinds = [k for _, k in args]
        values = [v.astype(np.int64) if k == "bool" else v for v, k in args]
        if name in _FLOAT_FUNCTIONS:
            x = np.asarray(values[0], np.float64)
            return getattr(np, name)(x), "float"
        kind = "float" if "float" in kinds else "int"
        if kind == "float":
            values = [np.asarray(v, np.float64) for v in values]
        if name == "abs":
            return np.abs(values[0]), kind
        return (np.minimum if name == "min" else np.maximum)(*values), kind


def kind_of(expr: Expr, aux_kinds: dict) -> str:
    """The kind ("int", "float", "bool") of an expression's value, from its tree and the kinds of
    the aux arrays it reads (names checked by the caller), with C++'s conversions."""
    return node_kind(expr.tree, aux_kinds)


def node_kind(node, aux_kinds: dict) -> str:
    """kind_of for a subtree."""
    def kind(node) -> str:
        tag = node[0]
        if tag in ("int", "float", "bool"):
            return tag
        if tag == "name":
            return "int" if node[2] in INDEX_NAMES else aux_kinds.get(node[2], "int")
        if tag == "index":
            base = node[2]
            while base[0] == "index":
                base = base[2]
            return aux_kinds.get(base[2], "int")
        if tag == "un":
            inner = kind(node[3])
            return "bool" if node[2] == "!" else ("int" if inner == "bool" else inner)
        if tag == "bin":
            if node[2] in ("&&", "||", "==", "!=", "<", "<=", ">", ">="):
                return "bool"
            return "float" if "float" in (kind(node[3]), kind(node[4])) else "int"
        if tag == "?":
            branches = (kind(node[3]), kind(node[4]))
            return "float" if "float" in branches else "int" if "int" in branches else "bool"
        if tag == "call":
            if node[2] in _FLOAT_FUNCTIONS:
                return "float"
            return "float" if any(kind(a) == "float" for a in node[3]) else "int"
        raise AssertionError(node)
    return kind(node)


# ---- the same expression in CUDA C++ (compiled into the kernels: kernels_cu/variant.cuh, UserTerms) ----

#: C++ element types of the aux dtypes the kernels read (numpy dtype str -> type)
CPP_TYPES = {"|b1": "bool", "|i1": "signed char", "|u1": "unsigned char", "<i2": "short", "<u2": "unsigned short",
             "<i4": "int", "<u4": "unsigned int", "<i8": "long long", "<u8": "unsigned long long", "<f2": "__half",
             "<f4": "float", "<f8": "double"}
#: how an aux value enters the expression: ints as 64-bit, floats as float, bools as bool
_READ_AS = {"int": "long long", "float": "float", "bool": "bool"}
_CPP_FUNCTIONS = {"exp": "expf", "log": "logf", "log2": "log2f", "sqrt": "sqrtf", "tanh": "tanhf", "floor": "floorf",
                  "ceil": "ceilf", "min": "user_min", "max": "user_max", "abs": "user_abs"}


def to_cpp(expr: Expr, aux: dict) -> str:
    """The expression as one C++ expression over b, h, q_idx, kv_idx (ints), with aux array ``name``
    read through ``aux[name] = (slot, C++ element type, kind, axes)`` as aux_read (variant.cuh) and int
    / and % through user_div, user_mod: C++'s rules, as evaluate() applies them, except that
    floats are 32-bit (float) in the kernels where NumPy computes in float64, and that an index out
    of bounds or a zero divisor sets ``bad`` (the kernels make the logit NaN) instead of raising.
    ``&&`` and ``||`` evaluate both sides, as evaluate() does (bitwise on bools: no branch)."""
    def go(node) -> str:
        tag = node[0]
        if tag == "int":
            return str(node[2]) if node[2] < 2 ** 31 else f"{node[2]}LL"
        if tag == "float":
            text = repr(float(node[2]))
            return f"{text}f" if any(c in text for c in ".e") else f"{text}.0f"
        if tag == "bool":
            return "true" if node[2] else "false"
        if tag == "name":
            if node[2] in INDEX_NAMES:
                return node[2]
            raise ExprError(expr.what, expr.text, node[1], f"aux array {node[2]!r} must be indexed")
        if tag == "index":
            base, indices = node, []
            while base[0] == "index":
                indices.insert(0, go(base[3]))
                base = base[2]
            slot, ctype, kind, ndim = aux[base[2]]
            if len(indices) != ndim:
                raise ExprError(expr.what, expr.text, base[1], f"aux array {base[2]!r} has {ndim} axes, indexed "
                                f"with {len(indices)}: index every one")
            return f"static_cast<{_READ_AS[kind]}>(aux_read<{ctype}>(u, {slot}, bad, {', '.join(indices)}))"
        if tag == "un":
            return f"({node[2]}{go(node[3])})"
        if tag == "bin":
            op = node[2]
            if op in ("/", "%") and node_kind(node, kinds) == "int":
                return f"{'user_div' if op == '/' else 'user_mod'}({go(node[3])}, {go(node[4])}, bad)"
            if op in ("&&", "||"):  # both sides evaluated, as here: no branch per score in the kernels
                return f"bool(bool({go(node[3])}) {op[0]} bool({go(node[4])}))"
            return f"({go(node[3])} {op} {go(node[4])})"
        if tag == "?":
            return f"({go(node[2])} ? {go(node[3])} : {go(node[4])})"
        if tag == "call":
            name, args = node[2], [go(a) for a in node[3]]
            if name in _FLOAT_FUNCTIONS:
                return f"{_CPP_FUNCTIONS[name]}(float({args[0]}))"
            return f"{_CPP_FUNCTIONS[name]}({', '.join(args)})"
        raise AssertionError(node)
    kinds = {name: kind for name, (_, _, kind, _) in aux.items()}
    return go(expr.tree)
