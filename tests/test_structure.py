"""House rules that a reader relies on: no function of the packages runs over 60 lines of code (docstring,
blank and comment lines excluded; nested functions count in their parent), so each reads as one step."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60


def code_lines(node: ast.AST, lines: list[str]) -> int:
    body = node.body
    start = body[0].lineno
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        start = body[1].lineno if len(body) > 1 else body[0].end_lineno + 1
    return sum(1 for ln in lines[start - 1:node.end_lineno] if ln.strip() and not ln.strip().startswith("#"))


def test_no_function_over_60_lines():
    long = []
    for pkg in ("model", "train", "code_edit", "eval", "scaffold"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            text = f.read_text()
            lines = text.split("\n")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node, lines) > LIMIT:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({code_lines(node, lines)} lines)")
    assert not long, long
