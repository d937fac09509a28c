"""Session 29 (issue #3): the README's Python blocks run, and say what they give.

Every fenced ``python`` block of the README (and of ``docs/PERFORMANCE.md``) is either marked
with an HTML comment on the line before its fence, ``<!-- runnable: NAME ... -->``, or is one
of the two blocks other tests run (the Quickstart: ``tests/test_examples.py`` and
``tests/test_review_s24_docs.py``; the ``bbb.load_run`` block: ``test_review_s24_docs.py``).
A marked block runs in a fresh Python process (one torch thread, a temporary working
directory), statement by statement:

- after the context ``CONTEXTS[NAME]`` builds what its prose implies (a block without an entry
  there must run as written: its own imports, its own data);
- a statement whose line ends in a shape comment, ``# (2, 4, 15, 15) ...`` or
  ``# (S, B, C) = (4, 3, 2)``, must give (assign) a tensor of that shape (the comment's first
  tuple of integers);
- an expression followed by a comment line, ``# Selection(indices=tensor([0, 1]), ...)``, must
  have that repr, ``...`` standing for any text and a remark after two or more spaces
  ignored;
- then ``CHECKS[NAME]``, assertions on what the block built.

The Markdown is read with ``test_review_s24_docs.snippets`` (the same reader as the other
documentation tests).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_review_s24_docs import ROOT, Snippet, snippets

DOCS = ("README.md", "docs/PERFORMANCE.md")
_MARK = re.compile(r"^<!-- runnable: ([\w-]+)\b.*-->\s*$")
#: a marked block's run, in seconds: measured 2-4 s each (torch's import included) on the
#: 2-core CPU; the limit leaves room for a loaded machine
TIMEOUT_S = 60

# ---------------------------------------------------------------------------------------------
# what the prose around a block implies, and what to check after it

_LAST_LAYER = """
import torch, bbb
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))

torch.manual_seed(0)
net = Net()
net.body(torch.randn(64, 4))  # "trained": BatchNorm statistics that are not the initial ones
net.eval()
net.train()
"""

_REGRESSION = """
import torch, bbb
from torch import nn

torch.manual_seed(0)
train, test = bbb.data.load_toy(64, 32)
x_test, y_test = test.tensors
model = nn.Sequential(bbb.BayesLinear(1, 16), nn.ReLU(), bbb.BayesLinear(16, 1))
likelihood = bbb.Gaussian(noise="learned")
elbo = bbb.ELBO(likelihood, dataset_size=len(train))
opt = torch.optim.Adam([*model.parameters(), *elbo.parameters()], lr=1e-2)
for _ in range(10):
    out = elbo(model, *train.tensors)
    opt.zero_grad(); out.loss.backward(); opt.step()
model.eval()
"""

CONTEXTS: dict[str, str] = {"last-layer": _LAST_LAYER, "regression-calibration": _REGRESSION}

CHECKS: dict[str, str] = {
    "conv-transpose": """
assert isinstance(bnet[0], bbb.BayesConvTranspose2d)
assert isinstance(bbb.to_deterministic(bnet)[0], nn.ConvTranspose2d)
""",
    "torch-func": """
params = dict(model.named_parameters())
assert grads.keys() == params.keys()
assert all(g.shape == params[k].shape and torch.isfinite(g).all() for k, g in grads.items())
# the KL's gradient reaches rho through the functional parameters (computed inside the call)
assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith("rho"))
""",
    "last-layer": """
assert isinstance(bayes.head, bbb.BayesLinear) and isinstance(net.head, nn.Linear)
assert not any(p.requires_grad for p in bayes.body.parameters())
assert not bayes.body.training and bayes.head.training
# MOPED: sigma = 0.1 |w| of the trained weights (softplus inverted exactly enough)
sigma = torch.nn.functional.softplus(bayes.head.weight_rho)
torch.testing.assert_close(sigma, 0.1 * net.head.weight.abs(), rtol=1e-3, atol=1e-6)
torch.testing.assert_close(bayes.head.weight_mu, net.head.weight)
""",
    "regression-calibration": """
import os
assert cov.coverage.shape == (5,) and ((0 <= cov.coverage) & (cov.coverage <= 1)).all()
assert (cov.mean_width.diff() > 0).all()  # wider intervals at higher levels
assert 0 <= bbb.metrics.regression_calibration_error(pred, y_test) <= 1
assert bbb.metrics.crps(pred, y_test) > 0
assert os.path.getsize("calibration.png") > 0
assert bbb.metrics.pit_values(pred, y_test).shape == y_test.shape
assert pred.cdf(y_test).shape == y_test.shape
assert pred.quantiles([0.05, 0.95], method="exact").shape == (2, *y_test.shape)
""",
    "batch-bald": """
# the copy of input 0 adds no information: BatchBALD takes input 2, whose joint information
# with input 0 is the one the README prints
assert abs(bbb.joint_mutual_information(sample_probs, [0, 1]) - 0.6931) < 1e-4
""",
}

#: the blocks that other test files run (matched by a name they use)
_RUN_ELSEWHERE = ("bbb.data.load_mnist(", "bbb.load_run(")

# ---------------------------------------------------------------------------------------------
# reading the blocks and their claims


@dataclass(frozen=True)
class Block:
    """A ``python`` block marked ``<!-- runnable: name -->``."""

    name: str
    snippet: Snippet


def python_blocks(doc: str) -> list[tuple[str | None, Snippet]]:
    """Every ``python`` block of ``doc`` with the name of its marker (None: unmarked)."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    out = []
    for s in snippets(doc):
        if s.lang != "python":
            continue
        before = lines[s.line - 2] if s.line >= 2 else ""  # the line above the fence
        m = _MARK.match(before.strip())
        out.append((m.group(1) if m else None, s))
    return out


def runnable_blocks() -> list[Block]:
    return [Block(n, s) for doc in DOCS for n, s in python_blocks(doc) if n is not None]


_INT_TUPLE = re.compile(r"\((\d+(?:\s*,\s*\d+)*)\s*,?\s*\)")


def shape_claim(comment: str) -> tuple[int, ...] | None:
    """The shape a trailing comment claims: it starts with ``(``, and its first parenthesised
    tuple of integers is the shape; None for any other comment."""
    if not comment.startswith("("):
        return None
    m = _INT_TUPLE.search(comment)
    return None if m is None else tuple(int(v) for v in m.group(1).split(","))


def repr_pattern(comment: str) -> str:
    """A regular expression for the repr a comment line shows: ``...`` is any text, a remark
    after two or more spaces is dropped."""
    shown = re.split(r"\s{2,}", comment.strip(), maxsplit=1)[0]
    return ".*?".join(re.escape(part) for part in shown.split("..."))


def _comment_at(line: str) -> str | None:
    """The comment that ends ``line`` (a ``#`` outside strings), without the ``# ``."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            return tok.string[1:].strip()
    return None


def steps(text: str) -> list[dict[str, object]]:
    """The block's top-level statements, each with its source, its line in the block and the
    claims its comments make (``shape``, ``repr``)."""
    lines = text.splitlines()
    tree = ast.parse(text)
    out: list[dict[str, object]] = []
    for node in tree.body:
        assert node.end_lineno is not None
        src = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        step: dict[str, object] = {"source": src, "line": node.lineno}
        if isinstance(node, ast.Expr | ast.Assign):
            comment = _comment_at(lines[node.end_lineno - 1])
            shape = shape_claim(comment) if comment else None
            if shape is not None:
                step["shape"] = list(shape)
        following = lines[node.end_lineno] if node.end_lineno < len(lines) else ""
        if isinstance(node, ast.Expr) and following.lstrip().startswith("#"):
            step["repr"] = repr_pattern(following.lstrip()[1:])
        out.append(step)
    return out


# the program a block runs in: statements and claims come as JSON on stdin
_DRIVER = r"""
import ast, json, re, sys
spec = json.load(sys.stdin)
ns = {"__name__": "__readme__"}
exec(compile(spec["context"], "<context>", "exec"), ns)
for step in spec["steps"]:
    where = f"{spec['doc']}:{spec['fence'] + step['line']}"
    node = ast.parse(step["source"]).body[0]
    if isinstance(node, ast.Expr):
        value = eval(compile(ast.Expression(node.value), where, "eval"), ns)
    else:
        exec(compile(step["source"], where, "exec"), ns)
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        value = ns[target.id] if isinstance(target, ast.Name) else None
    if "shape" in step:
        got = tuple(value.shape)
        if got != tuple(step["shape"]):
            sys.exit(f"{where}: shape {got}, the comment says {tuple(step['shape'])}")
    if "repr" in step and not re.fullmatch(step["repr"], repr(value), re.S):
        sys.exit(f"{where}: repr {value!r} does not match the comment's {step['repr']!r}")
exec(compile(spec["checks"], "<checks>", "exec"), ns)
print("ran", len(spec["steps"]), "statements")
"""


def run_block(name: str, block: Snippet, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``block`` as block ``name`` in a fresh interpreter, in ``cwd``, on one thread; a
    failure names the document's line."""
    spec = {
        "context": CONTEXTS.get(name, ""),
        "checks": CHECKS.get(name, ""),
        "steps": steps(block.text),
        "doc": block.doc,
        "fence": block.line,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )


# ---------------------------------------------------------------------------------------------
# the tests


def test_every_python_block_of_the_docs_is_run_by_some_test() -> None:
    """A new block must be marked (or be one of those run elsewhere): an unmarked one would
    rot unseen."""
    unmarked = [
        f"{s.doc}:{s.line}"
        for doc in DOCS
        for name, s in python_blocks(doc)
        if name is None and not any(use in s.text for use in _RUN_ELSEWHERE)
    ]
    assert unmarked == [], (
        "python blocks without a '<!-- runnable: NAME -->' line above the fence (see "
        f"{Path(__file__).name}): {unmarked}"
    )
    names = [b.name for b in runnable_blocks()]
    assert len(names) == len(set(names)), f"two blocks share a name: {sorted(names)}"
    # every context and check written here belongs to a block that exists
    assert set(CONTEXTS) | set(CHECKS) <= set(names), sorted(
        (set(CONTEXTS) | set(CHECKS)) - set(names)
    )


def test_the_readme_marks_its_blocks() -> None:
    """The reader finds the README's marked blocks (a broken marker pattern would find none and
    test nothing)."""
    assert [b.name for b in runnable_blocks()] == [
        "conv-transpose", "torch-func", "last-layer", "regression-calibration", "batch-bald"
    ]  # fmt: skip


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.name)
def test_a_marked_block_runs_and_gives_what_its_comments_say(block: Block, tmp_path: Path) -> None:
    """The block runs after its context, its shape and output comments hold, and so do the
    checks of what it built (``CHECKS``)."""
    where = f"{block.snippet.doc}:{block.snippet.line}"
    done = run_block(block.name, block.snippet, tmp_path)
    assert done.returncode == 0, f"{where} ({block.name}) failed:\n{done.stdout}{done.stderr}"
    assert "ran" in done.stdout


def test_the_claims_are_read_from_the_comments() -> None:
    assert shape_claim("(20, 2, 1, 28, 28): 20 weight samples") == (20, 2, 1, 28, 28)
    assert shape_claim("(2, 4, 15, 15) instead of (2, 4, 14, 14)") == (2, 4, 15, 15)
    assert shape_claim("(S, B, C) = (4, 3, 2)") == (4, 3, 2)
    assert shape_claim("(7,)") == (7,)
    assert shape_claim("one epoch of minibatches (128, 784)") is None
    pattern = repr_pattern(" BatchBALD(indices=tensor([0, 2]), exact=...)   a remark")
    assert re.fullmatch(pattern, "BatchBALD(indices=tensor([0, 2]), exact=tensor([True]))")
    assert not re.fullmatch(pattern, "BatchBALD(indices=tensor([0, 1]), exact=tensor([True]))")
    claims = steps("x = f()  # (3, 4)\nx.sum()\n# tensor(1.)\ny = 'a # (5,)'\n")
    assert [c.get("shape") for c in claims] == [[3, 4], None, None]
    assert claims[1]["repr"] == re.escape("tensor(1.)")


def test_a_block_that_says_the_wrong_thing_fails(tmp_path: Path) -> None:
    """The checks can fail: a wrong shape comment, and a wrong printed output, are reported
    naming the line and both values."""
    # no torch here: a stand-in with a shape keeps the check's own cost to an interpreter start
    shaped = "class Tensor:\n    shape = (2, 3)\n\n"
    wrong_shape = Snippet("doc.md", 10, "python", shaped + "x = Tensor()  # (2, 4)")
    done = run_block("doctored", wrong_shape, tmp_path)
    assert done.returncode != 0
    assert "doc.md:14: shape (2, 3), the comment says (2, 4)" in done.stderr
    wrong_repr = Snippet("doc.md", 10, "python", "x = 1\nx + 1\n# 3   a remark")
    done = run_block("doctored", wrong_repr, tmp_path)
    assert done.returncode != 0
    assert "doc.md:12: repr 2 does not match the comment's '3'" in done.stderr
    right = Snippet("doc.md", 10, "python", shaped + "x = Tensor()  # (2, 3)\nx.shape\n# (2, ...)")
    assert run_block("doctored", right, tmp_path).returncode == 0
