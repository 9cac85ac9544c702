"""Reading a model class's forward and rewriting its head region into the fused loss.

The class's own ``forward`` source (``ast``) is the specification: nothing is taken from the
config. The rewrite keeps every statement as the model wrote it (backbone call, slicing, MoE
router loss, output construction) and changes only the *head region*, the statements that touch
``logits``:

    logits = self.lm_head(H)                 ->  logits = __fused_ls__.Plan(self, "lm_head", H)
    logits = self.lm_head(H) * s             ->  ....mul(s)       (also  s * (...), (...) / s)
    logits = logits / c                      ->  logits = logits.div(c)
    logits = torch.tanh(logits)              ->  logits = logits.tanh()
    logits = logits * c                      ->  logits = logits.mul(c)   ([/c, tanh, ·c]: soft cap)
    logits = logits.float() / .contiguous()  ->  logits.float() / logits.contiguous()
    loss = self.loss_function(logits, ...)   ->  loss = __fused_ls__.loss(self, logits, ...)
    return Out(..., logits=logits, ...)      ->  Out(..., logits=__fused_ls__.logits(self, logits))
    output = (logits,) + outputs[1:]         ->  (__fused_ls__.logits(self, logits),) + ...

(also inside ``if`` blocks, e.g. Gemma's ``if self.config.final_logit_softcapping is not None:``).
A ``Plan`` records the head module, its input and the constant factors, each evaluated at call
time exactly where the model evaluates it; ``loss`` folds them into one fused call (the factors
into the hidden states, ``[/c, tanh, ·c]`` into ``softcap=c``) and ``logits`` replays them on the
real logits in eval mode (``None`` in training: no logits are built). Anything else that reads
the logits (a slice, a bias, a custom soft-cap function, a loss of its own), or logits that do not
come from one call of a head module, is refused with the statement (the head module itself is
checked at call time: ``_heads``). The logits variable is the one the forward hands to
``self.loss_function`` (``logits``, Falcon's ``lm_logits``). The rewritten function is compiled
with the original's globals (and closure), and the original's call-time decorators are applied to
it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
import sys
import textwrap
from dataclasses import dataclass

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import ModelOutput

from ._heads import check_loss, head_loss, refuse, resolve_head

RUNTIME = "__fused_ls__"  # the name the rewritten code calls the runtime by
_TANH = {"torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh"}
_IDENTITY = {"contiguous"}  # methods that do not change the values
# decorators that only edit the docstring: not re-applied
_DOC_ONLY = {"auto_docstring"}


@dataclass(frozen=True)
class ForwardSpec:
    """What the class's forward does, read from its source."""

    fused: object  # the rewritten forward, decorated like the original
    signature: inspect.Signature  # of the undecorated forward
    head: str  # the attribute the forward calls for the logits (e.g. "lm_head")
    caps: bool  # the forward soft-caps the logits
    loss_kwargs: bool  # the loss call forwards the forward's **kwargs (num_items_in_batch)
    vocab: str | None  # the source of the loss call's vocab_size


def _mentions(node, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _first_line(node) -> str:
    return ast.unparse(node).splitlines()[0]


class _Rewriter(ast.NodeTransformer):
    """One pass over the forward's body (source order); ``errors`` gets the first statement it
    cannot reproduce."""

    def __init__(self, cls, root: ast.FunctionDef, var: str):
        self.cls = cls
        self.root = root  # the forward's definition (nested definitions are not rewritten)
        self.var = var  # the name the forward gives the logits (logits, lm_logits)
        self.head = None  # attribute name of the head call
        self.ops: list = []  # (op, ast dump of its operand) in source order
        self.loss_calls = []
        self.outputs = []  # names of the output classes given logits=logits
        self.allowed = set()  # ids of the `logits` names the rewrite keeps
        self.stmt = None
        self.error = None

    def fail(self, why: str, node=None):
        if self.error is None:
            self.error = refuse(self.cls, f"its forward does `{_first_line(node or self.stmt)}`"
                                f" ({why})")  # fmt: skip
        return node

    def generic_visit(self, node):
        if isinstance(node, ast.stmt):
            outer, self.stmt = self.stmt, node
            try:
                return super().generic_visit(node)
            finally:
                self.stmt = outer
        return super().generic_visit(node)

    # ---- logits = <chain> ----
    def _is_head_call(self, e) -> bool:
        return (
            self.head is None
            and isinstance(e, ast.Call)
            and isinstance(e.func, ast.Attribute)
            and isinstance(e.func.value, ast.Name)
            and e.func.value.id == "self"
            and len(e.args) == 1
            and not e.keywords
            and not _mentions(e.args[0], self.var)
        )

    def _has_chain(self, e) -> bool:
        """Whether e holds the logits: a read of them, or (first) the head call."""
        if _mentions(e, self.var) or self._is_head_call(e):
            return True
        if isinstance(e, ast.BinOp):
            return self._has_chain(e.left) or self._has_chain(e.right)
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and not e.args:
            return self._has_chain(e.func.value)
        if isinstance(e, ast.Call) and len(e.args) == 1:
            return self._has_chain(e.args[0])
        return False

    def _chain(self, e):
        """The rewritten chain expression, or None (failed)."""
        if isinstance(e, ast.Name) and e.id == self.var:
            if self.head is None:
                return self.fail("logits read before the head computed them", e)
            return e
        if self._is_head_call(e):
            self.head = e.func.attr
            me = ast.Name("self", ast.Load())
            return _call(_attr(RUNTIME, "Plan"), me, ast.Constant(e.func.attr), e.func, e.args[0])
        if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Mult, ast.Div)):
            left, right = self._has_chain(e.left), self._has_chain(e.right)
            if isinstance(e.op, ast.Mult) and left != right:
                chain, factor = (e.left, e.right) if left else (e.right, e.left)
                inner = self._chain(chain)
                self.ops.append(("mul", ast.dump(factor)))
                method = "mul" if left else "rmul"
                return None if inner is None else _call(_attr(inner, method), factor)
            if isinstance(e.op, ast.Div) and left and not right:
                inner = self._chain(e.left)
                self.ops.append(("div", ast.dump(e.right)))
                return None if inner is None else _call(_attr(inner, "div"), e.right)
        if isinstance(e, ast.Call) and not e.keywords:
            fn = ast.unparse(e.func)
            if fn in _TANH and len(e.args) == 1:
                inner = self._chain(e.args[0])
                self.ops.append(("tanh", None))
                return None if inner is None else _call(_attr(inner, "tanh"))
            if isinstance(e.func, ast.Attribute) and not e.args:
                if e.func.attr == "float" or e.func.attr in _IDENTITY:
                    inner = self._chain(e.func.value)
                    if e.func.attr == "float":
                        self.ops.append(("float", None))
                    return None if inner is None else _call(_attr(inner, e.func.attr))
        why = "the logits do not come from one call of a head module"
        if self.head is not None:
            why = "an operation on the logits other than a constant scale or the final soft cap"
        return self.fail(why, e)

    def visit_Assign(self, node):
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == self.var:
                self.stmt = node
                value = self._chain(node.value)
                if value is not None:
                    node.value = value
                return node
        if any(_mentions(t, self.var) for t in node.targets):
            return self.fail("assigns the logits in a form that is not reproduced", node)
        return self.generic_visit(node)

    def visit_AugAssign(self, node):
        if isinstance(node.target, ast.Name) and node.target.id == self.var:
            self.stmt = node
            expr = ast.BinOp(ast.Name(self.var, ast.Load()), node.op, node.value)
            value = self._chain(expr)
            if value is None:
                return node
            return ast.copy_location(ast.Assign([ast.Name(self.var, ast.Store())], value), node)
        return self.generic_visit(node)

    def visit_Call(self, node):
        if _is_loss_call(node):
            logits = _loss_logits(node)
            rest = node.args[1:] + [k for k in node.keywords if k.arg != "logits"]
            if len(logits) != 1 or not (
                isinstance(logits[0], ast.Name) and logits[0].id == self.var
            ):
                return self.fail("the loss is not computed from the head's logits", node)
            if any(_mentions(r, self.var) for r in rest):
                return self.fail("the logits are passed to the loss twice", node)
            self.loss_calls.append(node)
            node.func = _attr(RUNTIME, "loss")
            node.args.insert(0, ast.Name("self", ast.Load()))
            return node
        if isinstance(node.func, ast.Name):  # Out(..., logits=logits): the eval-mode logits
            for k in node.keywords:
                if k.arg == "logits" and isinstance(k.value, ast.Name) and k.value.id == self.var:
                    self.outputs.append(node.func.id)
                    self.allowed.add(id(k.value))
                    k.value = _call(_attr(RUNTIME, "logits"), ast.Name("self", ast.Load()), k.value)
        return self.generic_visit(node)

    def visit_Tuple(self, node):
        # `output = (logits,) + outputs[1:]` (return_dict=False): the eval-mode logits too
        for i, elt in enumerate(node.elts):
            if isinstance(elt, ast.Name) and elt.id == self.var and isinstance(elt.ctx, ast.Load):
                self.allowed.add(id(elt))
                node.elts[i] = _call(_attr(RUNTIME, "logits"), ast.Name("self", ast.Load()), elt)
        return self.generic_visit(node)

    def visit_Name(self, node):
        if node.id == self.var and id(node) not in self.allowed:
            self.fail("the logits are used for something other than the loss and the output")
        return node

    def visit_FunctionDef(self, node):  # the forward itself only; nested defs are left alone
        if node is self.root:
            return self.generic_visit(node)
        if _mentions(node, self.var):
            return self.fail("a nested function reads the logits", node)
        return node

    visit_Lambda = visit_AsyncFunctionDef = visit_FunctionDef


def _logits_name(fdef) -> str:
    """The variable the forward hands to ``self.loss_function`` as the logits (``logits`` when
    there is no single such name)."""
    names = set()
    for node in ast.walk(fdef):
        if isinstance(node, ast.Call) and _is_loss_call(node):
            arg = _loss_logits(node)
            if arg and isinstance(arg[0], ast.Name):
                names.add(arg[0].id)
    return names.pop() if len(names) == 1 else "logits"


def _is_loss_call(node: ast.Call) -> bool:
    return ast.unparse(node.func) == "self.loss_function"


def _loss_logits(call: ast.Call) -> list:
    """The expressions a ``self.loss_function(...)`` call passes as the logits: its first
    positional argument and any ``logits=`` keyword."""
    return call.args[:1] + [k.value for k in call.keywords if k.arg == "logits"]


def _attr(value, name):
    if isinstance(value, str):
        value = ast.Name(value, ast.Load())
    return ast.Attribute(value, name, ast.Load())


def _call(func, *args):
    return ast.Call(func, list(args), [])


def _fold(who, ops, same) -> tuple[list, object]:
    """The operations the forward applies after the head call, [(op, operand)] in order, as one
    fused call: (the constant factors [("mul" | "div", c)], the soft cap c or None), where
    [/c, tanh, ·c] (``c·`` on either side) with ``same(c, c')`` is the soft cap. Refused (``who``:
    the model or its class) unless they are constant factors and upcasts, then at most one soft
    cap, then only upcasts. Read once on the source (the operands are the expressions; at most
    one cap: ``ForwardSpec.caps``) and at each call on the values the forward evaluated."""
    factors, cap, i = [], None, 0
    while i < len(ops):
        names = ["mul" if o == "rmul" else o for o, _ in ops[i : i + 3]]
        if names == ["div", "tanh", "mul"] and same(ops[i][1], ops[i + 2][1]):
            if cap is not None:
                raise refuse(who, "its head applies two soft caps")
            cap, i = ops[i][1], i + 3
            continue
        op, c = ops[i]
        if op == "tanh":
            raise refuse(
                who, "its head applies a tanh of the logits that is not the soft cap c·tanh(z / c)"
            )
        if op in ("mul", "rmul", "div"):
            if cap is not None:
                raise refuse(who, "its head applies a scale after the soft cap")
            factors.append(("div" if op == "div" else "mul", c))
        i += 1
    return factors, cap


@functools.cache
def read_forward(cls) -> ForwardSpec:
    """The rewritten forward of ``cls`` (cached per class), or ``UnsupportedModelError``."""
    func = getattr(cls, "forward", None)
    raw = inspect.unwrap(func) if func is not None else None
    try:
        source = textwrap.dedent(inspect.getsource(raw))
    except (OSError, TypeError) as e:
        raise refuse(cls, f"the source of its forward is not readable ({e})") from None
    fdef = ast.parse(source).body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise refuse(cls, "its forward is not a plain function")
    sig = inspect.signature(raw)
    if "labels" not in sig.parameters:
        raise refuse(cls, f"its forward takes no labels {sig}")
    var_kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    rw = _Rewriter(cls, fdef, _logits_name(fdef))
    rw.visit(fdef)
    if rw.error is not None:
        raise rw.error
    if not rw.loss_calls:
        raise refuse(cls, "its forward does not call self.loss_function (it computes its own loss)")
    if len(rw.loss_calls) != 1:
        raise refuse(cls, f"its forward calls self.loss_function {len(rw.loss_calls)} times")
    if rw.head is None:
        raise refuse(cls, f"its forward has no `{rw.var} = self.<head>(<hidden states>)` statement")
    for name in rw.outputs:
        if not (
            isinstance(raw.__globals__.get(name), type)
            and issubclass(raw.__globals__[name], ModelOutput)
        ):
            raise refuse(cls, f"its forward passes the logits to {name}, not a model output class")
    _, cap = _fold(cls, rw.ops, operator.eq)  # the source expressions (ast dumps)
    call = rw.loss_calls[0]
    loss_kwargs = any(k.arg is None and ast.unparse(k.value) in var_kw for k in call.keywords)
    # (the rewritten call: self, logits, labels, vocab_size, ...)
    vocab = [k.value for k in call.keywords if k.arg == "vocab_size"] + call.args[3:4]
    vocab = ast.unparse(vocab[0]) if vocab else None

    decorators = []
    for dec in fdef.decorator_list:
        name = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(name).split(".")[-1] in _DOC_ONLY:
            continue
        decorators.append(eval(compile(ast.Expression(dec), "<decorator>", "eval"),
                               raw.__globals__))  # fmt: skip
    fdef.decorator_list = []
    free = raw.__code__.co_freevars
    maker = ast.FunctionDef(
        name="__fused_ls_make__",
        args=ast.arguments([], [ast.arg(n) for n in (RUNTIME, *free)], None, [], [], None, []),
        body=[fdef, ast.Return(ast.Name(fdef.name, ast.Load()))],
        decorator_list=[],
        returns=None,
        **({"type_params": []} if sys.version_info >= (3, 12) else {}),
    )
    module = ast.fix_missing_locations(ast.Module([maker], []))
    code = compile(module, f"<fused_ls rewrite of {cls.__qualname__}.forward>", "exec")
    ns: dict = {}
    exec(code, raw.__globals__, ns)
    cells = [c.cell_contents for c in (raw.__closure__ or ())]
    fused = ns["__fused_ls_make__"](Runtime, *cells)
    fused = functools.reduce(lambda f, d: d(f), reversed(decorators), fused)
    return ForwardSpec(
        fused=fused,
        signature=sig,
        head=rw.head,
        caps=cap is not None,
        loss_kwargs=loss_kwargs,
        vocab=vocab,
    )


# ---- what the rewritten forward calls ------------------------------------------------------------


class Plan:
    """The logits as the forward would compute them, not computed: the head module (``owner``'s
    attribute ``name``), its input, and the operations the forward applies after it, in order."""

    __slots__ = ("owner", "name", "head", "hidden", "ops")

    def __init__(self, owner, name, head, hidden, ops=()):
        self.owner, self.name, self.head, self.hidden, self.ops = owner, name, head, hidden, ops

    def _then(self, *op):
        return Plan(self.owner, self.name, self.head, self.hidden, (*self.ops, op))

    def mul(self, c):
        return self._then("mul", c)

    def rmul(self, c):
        return self._then("rmul", c)

    def div(self, c):
        return self._then("div", c)

    def tanh(self):
        return self._then("tanh", None)

    def float(self):
        return self._then("float", None)

    def contiguous(self):
        return self

    def folded(self):
        """(factors [("mul"|"div", c)], cap or None), ``_fold`` of the values: [/c, tanh, ·c] with
        the same value c (the same object or equal numbers) is the soft cap."""
        factors, cap = _fold(self.owner, self.ops, _same)
        if torch.is_tensor(cap):
            cap = float(cap)
        return factors, cap

    def materialize(self):
        """The real logits: the head called, then each operation as the forward wrote it."""
        z = self.head(self.hidden)
        for op, c in self.ops:
            if op == "mul":
                z = z * c
            elif op == "rmul":
                z = c * z
            elif op == "div":
                z = z / c
            elif op == "tanh":
                z = torch.tanh(z)
            else:
                z = z.float()
        return z


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):
        return False


_LOSS_SIG = inspect.signature(ForCausalLMLoss)


class Runtime:
    """The functions the rewritten forward calls (``__fused_ls__.<name>``)."""

    Plan = Plan

    @staticmethod
    def logits(model, plan):
        """The output's logits: the real ones in eval mode (as the model computes them), None in
        training (the point of the fused loss) and while a trainer captures the statistics."""
        if not isinstance(plan, Plan):
            return plan
        state = model.fused_ls
        if model.training or state.capturing:
            return None
        return plan.materialize()

    @staticmethod
    def loss(model, *args, **kwargs):
        """``ForCausalLMLoss(logits, labels, vocab_size, ...)`` with the logits a ``Plan``: the
        same shift, ignore index and reduction, label-smoothed, one fused call."""
        try:
            bound = _LOSS_SIG.bind(*args, **kwargs)
        except TypeError:
            check_loss(model)  # a loss_function of its own is the reason, if it is one
            raise
        bound.apply_defaults()
        a = bound.arguments
        plan, labels, ignore_index = a["logits"], a["labels"], a["ignore_index"]
        num_items, shift_labels = a["num_items_in_batch"], a["shift_labels"]
        state = model.fused_ls
        head = resolve_head(model, plan.name, plan.head)  # hooks, PEFT, sharding: checked now
        check_loss(model, head, a["vocab_size"], state._spec.vocab)
        if shift_labels is None:
            padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        target = shift_labels.reshape(-1).to(plan.hidden.device)
        factors, cap = plan.folded()
        options = dict(
            state.options, ignore_index=ignore_index, reduction="sum" if num_items is not None
            else "mean",
        )  # fmt: skip
        loss, stats = head_loss(model, head, plan.hidden, factors, cap, target,
                                state.smoothing, options, state.capturing)  # fmt: skip
        if any(op == "float" for op, _ in plan.ops):  # the model's loss is fp32 then
            loss = loss.float()
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        if state.capturing:  # a copy: the forward may add to its loss in place (MoE: loss +=)
            state.captured = (loss.clone(), stats, target, ignore_index)
        return loss


__all__ = ["ForwardSpec", "Plan", "Runtime", "read_forward"]
